//! Turns text into the lines the deny rules see: the shell's and Markdown's ways of writing
//! the same command differently are undone first, so that a rule written for `rm -rf /`
//! also catches `r''m  -r\f "/"`, `${IFS}`-spaced words, a command continued over
//! backslash-newlines, hex escapes and base64 that a pipeline decodes.
//!
//! Normalization only ever removes disguise; what it produces is never executed, so it
//! may over-approximate the shell (dropping every quote, say) where that can only add
//! matches.

use std::ops::Range;
use std::sync::LazyLock;

use base64::Engine;
use regex::Regex;

use super::Context;

/// Base64 decoded into more text is decoded again this many times at most.
const MAX_DECODE_DEPTH: usize = 3;
/// Decoded text beyond this many bytes per check is not looked at (it is still refused if
/// the pipeline that decodes it runs into a shell: that is a rule of its own).
const MAX_DECODED_BYTES: usize = 256 * 1024;

/// One line as the deny rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub text: String,
    /// Decoded from base64 found in another line.
    pub decoded: bool,
}

/// The normalized lines of `text`, base64-decoded content appended after them.
pub fn lines(text: &str, ctx: &Context<'_>) -> Vec<Line> {
    let mut out = Vec::new();
    let mut budget = MAX_DECODED_BYTES;
    collect(text, ctx, false, 0, &mut budget, &mut out);
    out
}

fn collect(
    text: &str,
    ctx: &Context<'_>,
    decoded: bool,
    depth: usize,
    budget: &mut usize,
    out: &mut Vec<Line>,
) {
    let text = fold_chars(text);
    // A lone CR moves a terminal's cursor back over what was written: both halves count.
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    // Backslash-newline continues a shell command on the next line.
    let text = text.replace("\\\n", "");
    let first = out.len();
    for raw in text.split('\n') {
        // A Markdown fence line (```sh, ~~~) is formatting; what it encloses is checked
        // like any other line. Tool input is taken literally.
        if matches!(ctx, Context::Prompt) {
            let t = raw.trim_start();
            if t.starts_with("```") || t.starts_with("~~~") {
                continue;
            }
        }
        let line = normalize_line(raw);
        if !line.is_empty() {
            out.push(Line {
                text: line,
                decoded,
            });
        }
    }
    if depth >= MAX_DECODE_DEPTH {
        return;
    }
    let end = out.len();
    for i in first..end {
        for blob in decoded_blobs(&out[i].text) {
            if blob.len() > *budget {
                return;
            }
            *budget -= blob.len();
            collect(&blob, ctx, true, depth + 1, budget, out);
        }
    }
}

/// Characters that render as nothing or as ASCII: zero-width and bidi controls go, full-width
/// forms become ASCII, every kind of blank becomes a space.
fn fold_chars(text: &str) -> String {
    text.chars()
        .filter_map(|c| match c {
            // Zero-width and formatting characters (Unicode Cf) hide inside words.
            '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}' => None,
            '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0),
            '\n' | '\r' => Some(c),
            c if c.is_whitespace() => Some(' '),
            c => Some(c),
        })
        .collect()
}

static IFS: LazyLock<Regex> = LazyLock::new(|| {
    // `${IFS}`, `${IFS%??}`, `$IFS$9`: the shell's field separator standing in for a space.
    Regex::new(r"\$\{IFS[^}]*\}|\$IFS(?:\$[0-9])?").expect("static regex")
});
static EMPTY_EXPANSION: LazyLock<Regex> = LazyLock::new(|| {
    // Expansions that are empty in an interactive shell, spliced into words: `r$@m`, `$()`.
    Regex::new(r"\$\{?[@*]\}?|\$\(\s*\)|\$\{\s*\}").expect("static regex")
});

/// One line: escapes decoded, disguises removed, blanks collapsed.
pub fn normalize_line(line: &str) -> String {
    let line = decode_ansi_c(line);
    let line = decode_escapes(&line);
    let line = IFS.replace_all(&line, " ");
    let line = EMPTY_EXPANSION.replace_all(&line, "");
    let mut out = String::with_capacity(line.len());
    let mut blank = true;
    for c in line.chars() {
        match c {
            // Quotes only group words for the shell (`r''m` is `rm`); a backslash only
            // escapes the next character (`\rm`, `r\m`).
            '\'' | '"' | '\\' => {}
            // Command substitution with backticks (and Markdown's inline code) is a command
            // boundary.
            '`' => {
                if !blank {
                    out.push(' ');
                }
                out.push_str("; ");
                blank = true;
            }
            c if c.is_whitespace() => {
                if !blank {
                    out.push(' ');
                    blank = true;
                }
            }
            c => {
                out.push(c);
                blank = false;
            }
        }
    }
    let trimmed = out.trim_matches(|c: char| c == ' ' || c == ';');
    trimmed.to_owned()
}

/// `$'\x72\x6d'` (ANSI-C quoting) → `rm`.
fn decode_ansi_c(line: &str) -> String {
    if !line.contains("$'") {
        return line.to_owned();
    }
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(start) = rest.find("$'") {
        out.push_str(&rest[..start]);
        let body = &rest[start + 2..];
        let mut end = None;
        let mut escaped = false;
        for (i, c) in body.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '\'' => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let Some(end) = end else {
            out.push_str(&rest[start..]);
            return out;
        };
        out.push_str(&unescape(&body[..end], true));
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    out
}

/// `\x72`, `\162`, `\u0072` outside ANSI-C quotes (as `printf` and `echo -e` read them) →
/// the character, when it is printable ASCII.
fn decode_escapes(line: &str) -> String {
    if !line.contains('\\') {
        return line.to_owned();
    }
    unescape(line, false)
}

/// Decodes C escapes; with `all`, also the one-letter ones (`\n`, `\t`, `\'`).
fn unescape(s: &str, all: bool) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let mut start = 0;
    while i < b.len() {
        if b[i] != b'\\' || i + 1 >= b.len() {
            i += 1;
            continue;
        }
        let (value, len) = match b[i + 1] {
            b'x' => hex_value(&b[i + 2..], 2),
            b'u' => hex_value(&b[i + 2..], 4),
            b'0'..=b'7' => octal_value(&b[i + 1..]),
            b'n' | b't' | b'r' | b'v' | b'f' if all => (Some(u32::from(b' ')), 0),
            b'\\' | b'\'' | b'"' | b'?' if all => (Some(u32::from(b[i + 1])), 0),
            _ => (None, 0),
        };
        let printable = value
            .and_then(char::from_u32)
            .filter(|c| c.is_ascii_graphic() || *c == ' ');
        match printable {
            Some(c) => {
                out.push_str(&s[start..i]);
                out.push(c);
                // `len` counts the digits after `\x`/`\u` or the octal digits after `\`.
                i += match b[i + 1] {
                    b'x' | b'u' => 2 + len,
                    b'0'..=b'7' => 1 + len,
                    _ => 2,
                };
                start = i;
            }
            None => i += 1,
        }
    }
    out.push_str(&s[start..]);
    out
}

fn hex_value(b: &[u8], max: usize) -> (Option<u32>, usize) {
    let digits = b
        .iter()
        .take(max)
        .take_while(|c| c.is_ascii_hexdigit())
        .count();
    if digits == 0 {
        return (None, 0);
    }
    let text = std::str::from_utf8(&b[..digits]).unwrap_or("");
    (u32::from_str_radix(text, 16).ok(), digits)
}

fn octal_value(b: &[u8]) -> (Option<u32>, usize) {
    let digits = b
        .iter()
        .take(3)
        .take_while(|c| (b'0'..=b'7').contains(c))
        .count();
    // A single digit (`\1`) is a back-reference in sed, not a character: three digits only.
    if digits < 3 {
        return (None, 0);
    }
    let text = std::str::from_utf8(&b[..digits]).unwrap_or("");
    (u32::from_str_radix(text, 8).ok(), digits)
}

static DECODER: LazyLock<Regex> = LazyLock::new(|| {
    // Something on the line decodes base64: the blob next to it is what runs.
    Regex::new(
        r"(?i)\bbase64\b|b64decode|\batob\b|frombase64string|\bopenssl\s+(?:enc|base64)\b|\b(?:powershell|pwsh)(?:\.exe)?\b",
    )
    .expect("static regex")
});
static BLOB: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[A-Za-z0-9+/_-]{8,}={0,2}").expect("static regex"));

/// Text decoded from the base64 blobs of a line that also decodes base64.
fn decoded_blobs(line: &str) -> Vec<String> {
    if !DECODER.is_match(line) {
        return Vec::new();
    }
    BLOB.find_iter(line)
        .filter_map(|m| decode_blob(m.as_str()))
        .collect()
}

fn decode_blob(blob: &str) -> Option<String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let bytes = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(blob).ok())?;
    let text = text_of(&bytes)?;
    let printable = text
        .chars()
        .filter(|c| !c.is_control() || c.is_whitespace())
        .count();
    // Random bytes are not a command; a decoded command is (nearly) all text.
    (printable * 10 >= text.chars().count() * 9 && text.trim().len() >= 2).then_some(text)
}

/// UTF-8, or UTF-16LE (PowerShell's `-EncodedCommand`).
fn text_of(bytes: &[u8]) -> Option<String> {
    if let Ok(s) = std::str::from_utf8(bytes) {
        return Some(s.to_owned());
    }
    if bytes.len().is_multiple_of(2) && bytes.iter().skip(1).step_by(2).all(|b| *b == 0) {
        let units: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        return String::from_utf16(&units).ok();
    }
    None
}

/// The commands of a normalized line, as byte ranges without surrounding blanks: split at
/// every shell operator and grouping character (`;`, `&`, `|`, `(`, `)`, `{`, `}`, `<`,
/// `>`), so that an allow rule can speak for one simple command and never for what is
/// chained, piped, substituted or redirected around it.
pub fn segments(line: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let bounds = line
        .char_indices()
        .filter(|(_, c)| matches!(c, ';' | '&' | '|' | '(' | ')' | '{' | '}' | '<' | '>'))
        .map(|(i, c)| (i, i + c.len_utf8()))
        .chain(std::iter::once((line.len(), line.len())));
    for (at, next) in bounds {
        let piece = &line[start..at];
        // `$(` leaves its `$` behind.
        let trimmed = piece.trim_end_matches(['$', ' ']).trim_start();
        if !trimmed.is_empty() {
            let lead = piece.len() - piece.trim_start().len();
            out.push(start + lead..start + lead + trimmed.len());
        }
        start = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> Vec<String> {
        lines(s, &Context::Prompt)
            .into_iter()
            .map(|l| l.text)
            .collect()
    }

    #[test]
    fn quoting_escapes_and_blanks_are_undone() {
        assert_eq!(norm("r''m  -r\"f\"\t /"), ["rm -rf /"]);
        assert_eq!(norm(r"\rm -rf /"), ["rm -rf /"]);
        assert_eq!(norm("cat${IFS}/etc/shadow"), ["cat /etc/shadow"]);
        assert_eq!(norm("cat$IFS$9/etc/shadow"), ["cat /etc/shadow"]);
        assert_eq!(norm("r$@m -rf /"), ["rm -rf /"]);
        assert_eq!(norm(r"$'\x72\x6d' -rf /"), ["rm -rf /"]);
        assert_eq!(norm(r"printf '\x72\x6d -rf /'"), ["printf rm -rf /"]);
        assert_eq!(norm("rm \\\n -rf \\\n /"), ["rm -rf /"]);
        assert_eq!(norm("r\u{200b}m -rf /"), ["rm -rf /"]);
        assert_eq!(norm("ｒｍ -ｒｆ /"), ["rm -rf /"]);
        assert_eq!(norm("echo ok\rrm -rf /"), ["echo ok", "rm -rf /"]);
        assert_eq!(norm("say `id` now"), ["say ; id ; now"]);
    }

    #[test]
    fn fences_go_in_prompts_only() {
        let text = "Run this:\n```bash\nrm -rf /\n```\n";
        assert_eq!(norm(text), ["Run this:", "rm -rf /"]);
        // In tool input a backtick is command substitution: a separator like any other.
        let tool: Vec<String> = lines("```sh\nls", &Context::ToolCall { tool: "Bash" })
            .into_iter()
            .map(|l| l.text)
            .collect();
        assert_eq!(tool, ["sh", "ls"]);
    }

    #[test]
    fn base64_in_a_decoding_line_is_decoded() {
        // "rm -rf /"
        let got = lines("echo cm0gLXJmIC8= | base64 -d | sh", &Context::Prompt);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].text, "rm -rf /");
        assert!(got[1].decoded);
        // Without a decoder on the line, a blob is just a word.
        assert_eq!(lines("token cm0gLXJmIC8=", &Context::Prompt).len(), 1);
    }

    #[test]
    fn segments_split_at_every_operator() {
        let line = "ls -la && echo $(rm -rf ~) | tee > out";
        let got: Vec<&str> = segments(line).into_iter().map(|r| &line[r]).collect();
        assert_eq!(got, ["ls -la", "echo", "rm -rf ~", "tee", "out"]);
    }
}
