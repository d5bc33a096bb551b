//! The WAF: a regex tripwire for dangerous shell commands in prompts (and, through the
//! permission protocol, in tool calls). Text is normalized first (`normalize`), then
//! every deny rule runs on every line; a match is lifted only by an allow rule that
//! matches the whole simple command the match lies in, and never for a critical rule.
//! This is the reverse of the original HotPlex, whose unanchored allow-list ran first and
//! let a prompt through when any allow pattern matched anywhere in it.
//!
//! Rules are compiled once, at start (`config::load` compiles them to validate the
//! settings). A regex is a tripwire, not a sandbox: see `docs/security.md` for what this
//! can and cannot catch.

mod normalize;
pub mod rules;

use std::ops::Range;

use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::WafSettings;

/// How dangerous a match is. `waf.block_level` blocks at this level and above.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Destroys work that can usually be recovered (`git reset --hard`, `DROP TABLE`).
    Moderate,
    /// Reaches outside the session (root, network, persistence, secrets).
    High,
    /// Destroys the machine or hands it over (wiping disks, reverse shells, host escape).
    Critical,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Moderate => "moderate",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }
}

/// What kind of harm a rule guards against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    FileDestruction,
    Disk,
    PrivilegeEscalation,
    ReverseShell,
    RemoteCode,
    ForkBomb,
    Credentials,
    Exfiltration,
    ContainerEscape,
    Persistence,
    Kernel,
    System,
    Database,
    Vcs,
    Evasion,
    /// A rule from `waf.deny` without a category.
    Custom,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FileDestruction => "file_destruction",
            Self::Disk => "disk",
            Self::PrivilegeEscalation => "privilege_escalation",
            Self::ReverseShell => "reverse_shell",
            Self::RemoteCode => "remote_code",
            Self::ForkBomb => "fork_bomb",
            Self::Credentials => "credentials",
            Self::Exfiltration => "exfiltration",
            Self::ContainerEscape => "container_escape",
            Self::Persistence => "persistence",
            Self::Kernel => "kernel",
            Self::System => "system",
            Self::Database => "database",
            Self::Vcs => "vcs",
            Self::Evasion => "evasion",
            Self::Custom => "custom",
        }
    }
}

/// Where the text comes from; normalization differs slightly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context<'a> {
    /// A user's prompt: Markdown, with commands in code fences and inline code.
    Prompt,
    /// The input of an agent's tool call (`Bash`'s command, a file path), taken literally.
    ToolCall { tool: &'a str },
}

/// One rule that matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub rule_id: String,
    pub level: Level,
    pub category: Category,
    pub reason: String,
    /// What the rule matched, normalized (and shortened).
    pub fragment: String,
    /// The match was in text decoded from base64.
    pub decoded: bool,
    /// The allow rule that lifted this match, if one did.
    pub allowed_by: Option<String>,
}

/// `rule fs.rm_root (critical, file_destruction): deletes the root file system; matched "rm -rf /"`.
impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rule {} ({}, {}): {}; matched {:?}",
            self.rule_id,
            self.level.as_str(),
            self.category.as_str(),
            self.reason,
            self.fragment
        )?;
        if self.decoded {
            f.write_str(" (in decoded base64)")?;
        }
        Ok(())
    }
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing at or above `block_level` matched, or every such match was lifted.
    /// `notes` holds the matches that did not block.
    Allowed { notes: Vec<Finding> },
    /// The most severe match that is not lifted.
    Blocked(Finding),
}

impl Verdict {
    pub fn is_blocked(&self) -> bool {
        matches!(self, Self::Blocked(_))
    }

    /// The match that blocks, if any.
    pub fn blocked(&self) -> Option<&Finding> {
        match self {
            Self::Blocked(f) => Some(f),
            Self::Allowed { .. } => None,
        }
    }
}

/// A rule set that does not compile, naming its configuration key.
#[derive(Debug, thiserror::Error)]
#[error("key `{key}`: {reason}")]
pub struct Error {
    pub key: String,
    pub reason: String,
}

fn err(key: impl Into<String>, reason: impl Into<String>) -> Error {
    Error {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Rule ids: lower-case words joined by `.`, `_` or `-`, at most 64 characters.
pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
}

/// Compiled regexes are bounded: a pattern from the configuration cannot make one huge.
const REGEX_SIZE_LIMIT: usize = 4 << 20;
/// The most a fragment shows of a match, in characters.
const FRAGMENT_CHARS: usize = 120;

struct DenyRule {
    id: String,
    level: Level,
    category: Category,
    reason: String,
    regex: Regex,
    unless: Option<Regex>,
    raw: bool,
}

struct AllowRule {
    id: String,
}

/// The compiled rule set.
pub struct Waf {
    enabled: bool,
    block_level: Level,
    deny: Vec<DenyRule>,
    /// The rules matched on normalized lines, as one set; `lines_index[i]` is the rule of
    /// the set's pattern `i`.
    lines_set: RegexSet,
    lines_index: Vec<usize>,
    /// The rules matched on the raw text.
    raw_rules: Vec<usize>,
    allow: Vec<AllowRule>,
    /// Anchored: each pattern must match a whole simple command.
    allow_set: RegexSet,
}

impl std::fmt::Debug for Waf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waf")
            .field("enabled", &self.enabled)
            .field("block_level", &self.block_level)
            .field("deny_rules", &self.deny.len())
            .field("allow_rules", &self.allow.len())
            .finish()
    }
}

impl Waf {
    /// Compiles the built-in rules and those of the settings.
    pub fn new(settings: &WafSettings) -> Result<Self, Error> {
        for (i, id) in settings.disabled_rules.iter().enumerate() {
            let known = rules::RULES.iter().any(|r| r.id == id)
                || settings.deny.iter().any(|r| r.id == *id);
            if !known {
                return Err(err(
                    format!("waf.disabled_rules[{i}]"),
                    format!("no rule `{id}`"),
                ));
            }
        }
        let disabled = |id: &str| settings.disabled_rules.iter().any(|d| d == id);

        let mut deny = Vec::new();
        for r in rules::RULES.iter().filter(|r| !disabled(r.id)) {
            // Built-in patterns are tested; a failure here is a bug, reported like any other.
            let key = format!("built-in rule {}", r.id);
            deny.push(DenyRule {
                id: r.id.to_owned(),
                level: r.level,
                category: r.category,
                reason: r.reason.to_owned(),
                regex: compile(&key, &rules::expand(r.pattern), true)?,
                unless: r
                    .unless
                    .map(|u| compile(&key, &rules::expand(u), true))
                    .transpose()?,
                raw: r.raw,
            });
        }
        for (i, r) in settings.deny.iter().enumerate() {
            let key = format!("waf.deny[{i}]");
            if !valid_id(&r.id) {
                return Err(err(
                    format!("{key}.id"),
                    "must be 1-64 characters of a-z, 0-9, `.`, `_`, `-`",
                ));
            }
            if rules::RULES.iter().any(|b| b.id == r.id)
                || settings.deny[..i].iter().any(|o| o.id == r.id)
            {
                return Err(err(
                    format!("{key}.id"),
                    format!("`{}` is already a rule's id", r.id),
                ));
            }
            if r.reason.trim().is_empty() {
                return Err(err(format!("{key}.reason"), "must not be empty"));
            }
            if disabled(&r.id) {
                continue;
            }
            deny.push(DenyRule {
                id: r.id.clone(),
                level: r.level,
                category: r.category,
                reason: r.reason.clone(),
                regex: compile(&format!("{key}.pattern"), &r.pattern, true)?,
                unless: None,
                raw: false,
            });
        }

        let mut allow = Vec::new();
        let mut anchored = Vec::new();
        for (i, r) in settings.allow.iter().enumerate() {
            let key = format!("waf.allow[{i}]");
            if !valid_id(&r.id) || settings.allow[..i].iter().any(|o| o.id == r.id) {
                return Err(err(
                    format!("{key}.id"),
                    "must be unique, 1-64 characters of a-z, 0-9, `.`, `_`, `-`",
                ));
            }
            // Anchored here, whatever the pattern says: `\A(?:…)\z` keeps every branch of
            // an alternation anchored too.
            let pattern = format!(r"\A(?:{})\z", r.pattern);
            compile(&format!("{key}.pattern"), &pattern, false)?;
            anchored.push(pattern);
            allow.push(AllowRule { id: r.id.clone() });
        }
        let allow_set = RegexSetBuilder::new(&anchored)
            .size_limit(REGEX_SIZE_LIMIT * 4)
            .build()
            .map_err(|e| err("waf.allow", e.to_string()))?;

        let lines_index: Vec<usize> = (0..deny.len()).filter(|&i| !deny[i].raw).collect();
        let raw_rules = (0..deny.len()).filter(|&i| deny[i].raw).collect();
        let lines_set = RegexSetBuilder::new(lines_index.iter().map(|&i| deny[i].regex.as_str()))
            .case_insensitive(true)
            .size_limit(REGEX_SIZE_LIMIT * 16)
            .dfa_size_limit(REGEX_SIZE_LIMIT * 8)
            .build()
            .map_err(|e| err("waf.deny", e.to_string()))?;

        Ok(Self {
            enabled: settings.enabled,
            block_level: settings.block_level,
            deny,
            lines_set,
            lines_index,
            raw_rules,
            allow,
            allow_set,
        })
    }

    /// Whether checks run at all (`waf.enabled`).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Checks `text`: every deny rule on every normalized line; see the module docs.
    pub fn check(&self, text: &str, ctx: Context<'_>) -> Verdict {
        if !self.enabled {
            return Verdict::Allowed { notes: Vec::new() };
        }
        let mut findings = Vec::new();
        for &i in &self.raw_rules {
            let rule = &self.deny[i];
            if let Some(m) = rule.regex.find(text) {
                findings.push(self.finding(
                    rule,
                    &m.as_str().escape_default().to_string(),
                    false,
                    None,
                ));
            }
        }
        for line in normalize::lines(text, &ctx) {
            let hits = self.lines_set.matches(&line.text);
            if !hits.matched_any() {
                continue;
            }
            let segments = normalize::segments(&line.text);
            for i in hits.iter() {
                let rule = &self.deny[self.lines_index[i]];
                for m in rule.regex.find_iter(&line.text) {
                    let span = trim_span(&line.text, m.range());
                    let fragment = &line.text[span.clone()];
                    if rule.unless.as_ref().is_some_and(|u| u.is_match(fragment)) {
                        continue;
                    }
                    // A critical match is never lifted: only removing the rule
                    // (`waf.disabled_rules`) lets it through.
                    let allowed_by = (rule.level < Level::Critical)
                        .then(|| self.allowed(&line.text, &segments, &span))
                        .flatten();
                    let lifted = allowed_by.is_some();
                    findings.push(self.finding(rule, fragment, line.decoded, allowed_by));
                    // One match of a rule that stands is enough for this line.
                    if !lifted {
                        break;
                    }
                }
            }
        }
        let mut decisive: Option<usize> = None;
        for (i, f) in findings.iter().enumerate() {
            let blocks = f.allowed_by.is_none() && f.level >= self.block_level;
            if blocks && decisive.is_none_or(|d| f.level > findings[d].level) {
                decisive = Some(i);
            }
        }
        match decisive {
            Some(i) => Verdict::Blocked(findings.swap_remove(i)),
            None => {
                // A rule noted once per way it was let through: a long prompt repeating an
                // allowed command must not turn into thousands of notes (and log lines).
                let mut seen = std::collections::HashSet::new();
                findings.retain(|f| seen.insert((f.rule_id.clone(), f.allowed_by.clone())));
                Verdict::Allowed { notes: findings }
            }
        }
    }

    /// The allow rule that matches the whole simple command `span` lies in.
    fn allowed(
        &self,
        line: &str,
        segments: &[Range<usize>],
        span: &Range<usize>,
    ) -> Option<String> {
        if self.allow.is_empty() {
            return None;
        }
        let segment = segments
            .iter()
            .find(|s| s.start <= span.start && span.end <= s.end)?;
        let hit = self
            .allow_set
            .matches(&line[segment.clone()])
            .iter()
            .next()?;
        Some(self.allow[hit].id.clone())
    }

    fn finding(
        &self,
        rule: &DenyRule,
        fragment: &str,
        decoded: bool,
        allowed_by: Option<String>,
    ) -> Finding {
        let mut shown: String = fragment.chars().take(FRAGMENT_CHARS).collect();
        if shown.len() < fragment.len() {
            shown.push('…');
        }
        Finding {
            rule_id: rule.id.clone(),
            level: rule.level,
            category: rule.category,
            reason: rule.reason.clone(),
            fragment: shown,
            decoded,
            allowed_by,
        }
    }
}

fn compile(key: &str, pattern: &str, case_insensitive: bool) -> Result<Regex, Error> {
    RegexBuilder::new(pattern)
        .case_insensitive(case_insensitive)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| err(key, format!("invalid regex: {e}")))
}

/// A match without the blanks and operators its pattern consumed at either end.
fn trim_span(line: &str, range: Range<usize>) -> Range<usize> {
    let edge = |c: char| c.is_whitespace() || matches!(c, ';' | '&' | '|' | '(' | ')');
    let text = &line[range.clone()];
    let start = range.start + (text.len() - text.trim_start_matches(edge).len());
    let end = range.end - (text.len() - text.trim_end_matches(edge).len());
    if start >= end {
        return range;
    }
    start..end
}

#[cfg(test)]
mod tests;
