//! Typed settings, loaded once at startup: built-in defaults → YAML file → `HOTPLEX_*`
//! environment (and `DATABASE_URL`) → command-line flags. Nothing else reads the environment
//! for configuration, and settings never change while the process runs.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::providers::{Format, Serialized, Yaml};
use figment::value::{Dict, Value};
use figment::{Figment, Profile};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "configs/hotplex.yaml";
/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "HOTPLEX_";

/// `HOTPLEX_*` variables that are flags of the command line rather than settings.
const NON_SETTING_ENV: &[&str] = &["CONFIG"];

/// A secret string: never printed, logged or serialized in clear.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    /// The clear value, for the one place that needs it (a connection, a hash).
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[redacted]")
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// Every setting of hotplex. See `configs/hotplex.yaml` for the documented file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address the HTTP API binds.
    pub listen: SocketAddr,
    /// Root of hotplex's own state: the embedded Postgres cluster, work dirs.
    pub data_dir: PathBuf,
    /// External Postgres; when absent `up` runs an embedded cluster under `data_dir`.
    pub database_url: Option<Secret>,
    /// An admin API key that `up` makes sure exists (for automation).
    pub bootstrap_key: Option<Secret>,
    /// Log format (`pretty` or `json`).
    pub log_format: LogFormat,
    /// Log filter directives (`RUST_LOG` syntax); `RUST_LOG` itself wins when set.
    pub log_level: String,
    /// Where session work directories are created; default `<data_dir>/work`.
    pub work_root: Option<PathBuf>,
    /// Absolute directories (besides `work_root`) a session's `work_dir` may point into.
    pub allowed_work_dirs: Vec<PathBuf>,
    pub database: DatabaseSettings,
    pub http: HttpSettings,
    pub embedded: EmbeddedSettings,
    pub worker: WorkerSettings,
    pub providers: ProvidersSettings,
    pub auth: AuthSettings,
    pub waf: WafSettings,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    /// Sessions one worker keeps warm at most; when full, the least recently active idle
    /// one is evicted, and when all run turns, new work waits in the queue.
    pub capacity: u32,
    /// How long a session's lease lasts unless renewed (renewed every third of it).
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// A warm agent process with no turn for this long is stopped (resumed on next turn).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A turn running longer than this fails.
    #[serde(with = "humantime_serde")]
    pub turn_timeout: Duration,
    /// A turn with no output from the agent for this long is interrupted, then killed.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// Between SIGTERM and SIGKILL when an agent process is stopped.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// How long a draining worker (SIGTERM, `hotplex worker drain`) lets its running turns
    /// finish before it interrupts them.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// An agent process whose resident memory exceeds this many MiB after a turn is
    /// recycled: stopped, and resumed (same conversation) by the next turn. 0: no limit.
    /// Claude Code's process only: OpenCode's server is shared by the worker's sessions.
    pub max_agent_rss_mb: u64,
    /// Claude Code processes kept started and initialized ahead of need, so that a new
    /// session's first turn skips the CLI's cold start (sessions with default settings
    /// only). Extra to `capacity`. 0: none.
    pub warm_spares: u32,
    /// Finished queue jobs (spent wake-ups; the turns and events are the record) are
    /// deleted this long after they finished.
    #[serde(with = "humantime_serde")]
    pub job_retention: Duration,
    /// Resource limits of every agent process (and the tools it runs); core dumps are
    /// always off.
    pub agent_limits: crate::provider::process::Limits,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            capacity: 32,
            lease_ttl: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(30 * 60),
            turn_timeout: Duration::from_secs(30 * 60),
            stall_timeout: Duration::from_secs(10 * 60),
            stop_grace: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(60),
            max_agent_rss_mb: 2048,
            warm_spares: 0,
            job_retention: Duration::from_secs(24 * 3600),
            agent_limits: crate::provider::process::Limits::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Upper bound of the connection pool.
    pub max_connections: u32,
    /// How long a request waits for a pooled connection.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Time until response headers; streaming bodies are not bounded by it.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Largest accepted request body, in bytes.
    pub body_limit: usize,
    /// How long shutdown waits for in-flight requests.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Origins allowed by CORS; empty = no cross-origin access; `*` = any origin.
    pub cors_allowed_origins: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedSettings {
    /// Directory holding `initdb` and `postgres`; found automatically when absent.
    pub bin_dir: Option<PathBuf>,
    /// Unprivileged user that runs Postgres when hotplex runs as root
    /// (default: `postgres`, else `nobody`).
    pub run_as: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProvidersSettings {
    pub claude_code: ProviderSettings,
    pub opencode: ProviderSettings,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    /// Executable (a name on `PATH` or a path).
    pub binary: PathBuf,
    /// Extra arguments appended to the command line.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment for the agent process (it gets nothing else of ours).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `HOME` of the agent processes (their transcripts and settings live there);
    /// default `<data_dir>/agent-home`.
    #[serde(default)]
    pub home: Option<PathBuf>,
    /// Models offered to OpenCode clients (`/config/providers`); the first is the default.
    /// `default` means "the agent's own default" (no model flag).
    #[serde(default = "default_models")]
    pub models: Vec<String>,
}

fn default_models() -> Vec<String> {
    vec!["default".into()]
}

/// How callers authenticate besides API keys (which always work).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// JWT bearer tokens from one issuer; off when absent.
    pub jwt: Option<JwtSettings>,
}

/// JWT bearer tokens (RFC 8725 practice): one issuer, one audience, one pinned algorithm
/// and its keys. The checks are in `auth::jwt`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSettings {
    /// The exact `iss` of accepted tokens.
    pub issuer: String,
    /// The `aud` accepted tokens must name (a string, or one entry of an array).
    pub audience: String,
    /// The one accepted `alg`; a token whose header names another is refused.
    pub algorithm: JwtAlgorithm,
    /// The HMAC secret, for `HS256` only (at least 32 bytes).
    #[serde(default)]
    pub hs256_secret: Option<Secret>,
    /// A PEM file with the issuer's public key (`RS256`, `ES256`, `EdDSA`).
    #[serde(default)]
    pub public_key_pem: Option<PathBuf>,
    /// A JWKS file with the issuer's public keys, chosen by the token's `kid`; re-read when
    /// a token names a `kid` it lacks (at most every 10 s), so keys rotate without a restart.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Clock skew allowed on `exp` and `nbf`; at most 60 s.
    #[serde(default = "default_jwt_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// The claim naming the caller's tenant (a tenant name).
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// The claim carrying the role: `admin`, or an array containing `admin`, makes an
    /// admin; anything else (or no claim) a user.
    #[serde(default = "default_role_claim")]
    pub role_claim: String,
    /// When set, the header's `typ` must be this (e.g. `at+jwt`, RFC 9068).
    #[serde(default)]
    pub required_typ: Option<String>,
    /// Create a token's tenant on first use; when false such a token is refused (403).
    #[serde(default)]
    pub auto_create_tenants: bool,
}

/// The algorithms a deployment may pin. No `none`, and HMAC only with its own secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
    ES256,
    EdDSA,
}

fn default_jwt_leeway() -> Duration {
    Duration::from_secs(30)
}

fn default_tenant_claim() -> String {
    "tenant".into()
}

fn default_role_claim() -> String {
    "role".into()
}

/// The keys of `auth.jwt`, for the environment check (the section is absent by default,
/// so the serialized defaults cannot name them).
const JWT_KEYS: &[&str] = &[
    "issuer",
    "audience",
    "algorithm",
    "hs256_secret",
    "public_key_pem",
    "jwks_file",
    "leeway",
    "tenant_claim",
    "role_claim",
    "required_typ",
    "auto_create_tenants",
];

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: default_data_dir(),
            database_url: None,
            bootstrap_key: None,
            log_format: LogFormat::Pretty,
            log_level: "info,sqlx=warn".into(),
            work_root: None,
            allowed_work_dirs: Vec::new(),
            database: DatabaseSettings::default(),
            http: HttpSettings::default(),
            embedded: EmbeddedSettings::default(),
            worker: WorkerSettings::default(),
            providers: ProvidersSettings::default(),
            auth: AuthSettings::default(),
            waf: WafSettings::default(),
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            max_connections: 20,
            acquire_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            body_limit: 1024 * 1024,
            shutdown_timeout: Duration::from_secs(15),
            cors_allowed_origins: Vec::new(),
        }
    }
}

impl Default for ProvidersSettings {
    fn default() -> Self {
        Self {
            claude_code: ProviderSettings {
                binary: "claude".into(),
                args: Vec::new(),
                env: BTreeMap::new(),
                home: None,
                models: vec![
                    "default".into(),
                    "sonnet".into(),
                    "opus".into(),
                    "haiku".into(),
                ],
            },
            opencode: ProviderSettings {
                binary: "opencode".into(),
                args: Vec::new(),
                env: BTreeMap::new(),
                home: None,
                models: default_models(),
            },
        }
    }
}

/// The WAF ([`crate::waf`]): which deny rules run, from what level they block, and the
/// anchored allow rules that may lift a match. Compiled (and so checked) at load.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WafSettings {
    /// Check prompts at all.
    pub enabled: bool,
    /// Matches of this level and above block (`moderate`, `high`, `critical`); lower ones
    /// are only logged.
    pub block_level: crate::waf::Level,
    /// Ids of rules (built-in or from `deny`) that do not run.
    pub disabled_rules: Vec<String>,
    /// Deny rules of the deployment, besides the built-in ones.
    pub deny: Vec<WafDenyRule>,
    /// Allow rules: each lifts a match of a moderate or high deny rule when it matches the
    /// whole simple command the match lies in. Never a critical one.
    pub allow: Vec<WafAllowRule>,
}

impl Default for WafSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            block_level: crate::waf::Level::High,
            disabled_rules: Vec::new(),
            deny: Vec::new(),
            allow: Vec::new(),
        }
    }
}

/// A deny rule of `waf.deny`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WafDenyRule {
    /// A unique id (`a-z0-9._-`), shown when the rule blocks.
    pub id: String,
    /// A regex (case-insensitive) matched against each normalized line.
    pub pattern: String,
    pub level: crate::waf::Level,
    #[serde(default = "custom_category")]
    pub category: crate::waf::Category,
    /// Why it blocks, shown to the client.
    pub reason: String,
}

fn custom_category() -> crate::waf::Category {
    crate::waf::Category::Custom
}

/// An allow rule of `waf.allow`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WafAllowRule {
    /// A unique id, recorded when the rule lifts a match.
    pub id: String,
    /// A regex (case-sensitive) that must match a whole simple command: it is anchored at
    /// both ends, whatever it says.
    pub pattern: String,
    /// What it is for (documentation only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// XDG data dir + `/hotplex` (e.g. `~/.local/share/hotplex`), or `./.hotplex` without a home.
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .map(|d| d.join("hotplex"))
        .unwrap_or_else(|| PathBuf::from(".hotplex"))
}

impl Settings {
    /// Directory under which session work dirs are created.
    pub fn work_root(&self) -> PathBuf {
        self.work_root
            .clone()
            .unwrap_or_else(|| self.data_dir.join("work"))
    }

    /// `HOME` of the agent processes of a provider.
    pub fn agent_home(&self, provider: &ProviderSettings) -> PathBuf {
        provider
            .home
            .clone()
            .unwrap_or_else(|| self.data_dir.join("agent-home"))
    }
}

/// Values given on the command line; they win over every other source.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
}

/// Where to look for the YAML file.
#[derive(Debug, Clone)]
pub enum ConfigFile {
    /// Named explicitly: it must exist.
    Explicit(PathBuf),
    /// The default path, read only if present.
    Default,
}

impl ConfigFile {
    pub fn from_arg(path: Option<PathBuf>) -> Self {
        path.map(Self::Explicit).unwrap_or(Self::Default)
    }
}

/// Settings plus what loading them noticed (reported once logging is up).
#[derive(Debug)]
pub struct Loaded {
    pub settings: Settings,
    /// The file that was read, if any.
    pub file: Option<PathBuf>,
    /// Ignored `HOTPLEX_*` variables that match no setting.
    pub warnings: Vec<String>,
}

/// A configuration problem, naming its source and key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// Loads the settings from the process environment.
pub fn load(file: &ConfigFile, overrides: &Overrides) -> Result<Loaded, Error> {
    load_from(file, overrides, std::env::vars())
}

/// Loads the settings from the given environment (tests pass their own).
pub fn load_from(
    file: &ConfigFile,
    overrides: &Overrides,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, Error> {
    let env: Vec<(String, String)> = env.into_iter().collect();
    let mut figment = Figment::from(Serialized::defaults(Settings::default()));

    let path = match file {
        ConfigFile::Explicit(p) => {
            if !p.is_file() {
                return Err(Error::File {
                    path: p.clone(),
                    reason: "no such file".into(),
                });
            }
            Some(p.clone())
        }
        ConfigFile::Default => {
            let p = PathBuf::from(DEFAULT_CONFIG_FILE);
            p.is_file().then_some(p)
        }
    };
    if let Some(p) = &path {
        // Read it ourselves so that an unreadable file is reported as such, not as empty.
        let text = std::fs::read_to_string(p).map_err(|e| Error::File {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        // A file of comments only (like the shipped template) is an empty YAML document.
        let empty = serde_yaml::from_str::<serde_yaml::Value>(&text).is_ok_and(|v| v.is_null());
        if !empty {
            figment = figment.merge(Yaml::file_exact(p));
        }
    }

    let known = known_keys();
    let mut warnings = Vec::new();
    let mut hotplex_env = Vec::new();
    let mut database_url = None;
    for (name, value) in env {
        if name == "DATABASE_URL" {
            database_url = Some(value);
            continue;
        }
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if NON_SETTING_ENV.contains(&rest) {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if is_known(&known, &path) {
            hotplex_env.push((name, value));
        } else {
            warnings.push(format!("ignoring {name}: it matches no setting"));
        }
    }
    // `DATABASE_URL` is the conventional name; `HOTPLEX_DATABASE_URL` wins over it.
    if let Some(url) = database_url {
        figment = figment.merge(Serialized::default("database_url", url));
    }
    let env_provider = env_provider(hotplex_env);
    figment = figment.merge(env_provider);

    if let Some(listen) = overrides.listen {
        figment = figment.merge(Serialized::default("listen", listen));
    }
    if let Some(dir) = &overrides.data_dir {
        figment = figment.merge(Serialized::default("data_dir", dir));
    }
    if let Some(format) = overrides.log_format {
        figment = figment.merge(Serialized::default("log_format", format));
    }

    let settings: Settings = figment.extract().map_err(describe)?;
    validate(&settings)?;
    Ok(Loaded {
        settings,
        file: path,
        warnings,
    })
}

/// An `Env` provider over a fixed list of variables, so tests need not touch the process env.
fn env_provider(vars: Vec<(String, String)>) -> impl figment::Provider {
    struct Fixed(Vec<(String, String)>);
    impl figment::Provider for Fixed {
        fn metadata(&self) -> figment::Metadata {
            figment::Metadata::named("environment variable").interpolater(|_, keys| {
                let name: Vec<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
                format!("{ENV_PREFIX}{}", name.join("__"))
            })
        }
        fn data(&self) -> Result<figment::value::Map<Profile, Dict>, figment::Error> {
            // Reuse figment's own parsing of env values (numbers, bools, arrays).
            let mut dict = Dict::new();
            for (name, value) in &self.0 {
                let parts: Vec<&str> = name[ENV_PREFIX.len()..].split("__").collect();
                // `providers.<p>.env.<NAME>` is the child's environment: keep the variable
                // name's case and the value as text.
                let child_env = parts.len() == 4
                    && parts[0].eq_ignore_ascii_case("providers")
                    && parts[2].eq_ignore_ascii_case("env");
                let key = parts
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        if child_env && i == 3 {
                            p.to_string()
                        } else {
                            p.to_ascii_lowercase()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(".");
                // JWT names and secrets are text even when they look like numbers (a
                // numeric audience, an all-digit secret).
                let jwt_text = parts.len() == 3
                    && parts[0].eq_ignore_ascii_case("auth")
                    && parts[1].eq_ignore_ascii_case("jwt")
                    && !parts[2].eq_ignore_ascii_case("auto_create_tenants");
                let parsed: Value = if child_env || jwt_text {
                    Value::from(value.clone())
                } else {
                    value.parse().unwrap_or_else(|_| Value::from(value.clone()))
                };
                let nested = figment::util::nest(&key, parsed);
                if let Value::Dict(_, d) = nested {
                    dict = merge_dicts(dict, d);
                }
            }
            Ok(Profile::Default.collect(dict))
        }
    }
    Fixed(vars)
}

fn merge_dicts(mut a: Dict, b: Dict) -> Dict {
    for (k, v) in b {
        let merged = match (a.remove(&k), v) {
            (Some(Value::Dict(_, x)), Value::Dict(tag, y)) => Value::Dict(tag, merge_dicts(x, y)),
            (_, v) => v,
        };
        a.insert(k, merged);
    }
    a
}

/// The tree of setting names, from the serialized defaults.
fn known_keys() -> Dict {
    let value = Figment::from(Serialized::defaults(Settings::default()))
        .extract::<Value>()
        .ok()
        .and_then(|v| v.into_dict());
    value.unwrap_or_default()
}

fn is_known(tree: &Dict, path: &[String]) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    // Optional settings serialize as absent; accept their names explicitly.
    const OPTIONAL: &[&str] = &["database_url", "bootstrap_key", "work_root"];
    if rest.is_empty() && OPTIONAL.contains(&first.as_str()) {
        return true;
    }
    if path.len() == 2 && first == "embedded" && ["bin_dir", "run_as"].contains(&rest[0].as_str()) {
        return true;
    }
    if path.len() == 3 && first == "providers" && path[2] == "home" {
        return true;
    }
    if path.len() == 3 && first == "auth" && path[1] == "jwt" {
        return JWT_KEYS.contains(&path[2].as_str());
    }
    // Provider `env` maps take any variable name.
    if path.len() == 4 && first == "providers" && path[2] == "env" {
        return tree
            .get("providers")
            .and_then(|v| v.as_dict())
            .is_some_and(|p| p.contains_key(&path[1]));
    }
    match tree.get(first) {
        Some(Value::Dict(_, sub)) => !rest.is_empty() && is_known(sub, rest),
        Some(_) => rest.is_empty(),
        None => false,
    }
}

/// Turns figment's errors into one message per problem: source, key, reason.
fn describe(err: figment::Error) -> Error {
    let lines: Vec<String> = err
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let source = match &e.metadata {
                Some(md) if md.name.starts_with("environment variable") && !e.path.is_empty() => {
                    format!(
                        "environment variable {}",
                        md.interpolate(&Profile::Default, &e.path)
                    )
                }
                Some(md) => match &md.source {
                    Some(src) => format!("{} ({src})", md.name),
                    None => md.name.to_string(),
                },
                None => "configuration".into(),
            };
            if key.is_empty() {
                format!("{source}: {}", e.kind)
            } else {
                format!("{source}: key `{key}`: {}", e.kind)
            }
        })
        .collect();
    Error::Invalid(lines.join("\n"))
}

/// Checks that serde cannot express.
fn validate(s: &Settings) -> Result<(), Error> {
    let bad = |key: &str, reason: &str| Err(Error::Invalid(format!("key `{key}`: {reason}")));
    if s.data_dir.as_os_str().is_empty() {
        return bad("data_dir", "must not be empty");
    }
    if s.http.body_limit == 0 {
        return bad("http.body_limit", "must be greater than 0");
    }
    if s.http.request_timeout.is_zero() {
        return bad("http.request_timeout", "must be greater than 0");
    }
    for (key, p) in [
        ("providers.claude_code.models", &s.providers.claude_code),
        ("providers.opencode.models", &s.providers.opencode),
    ] {
        if p.models.is_empty() || p.models.iter().any(|m| m.trim().is_empty()) {
            return bad(key, "must list at least one model, none empty");
        }
    }
    let w = &s.worker;
    if w.capacity == 0 {
        return bad("worker.capacity", "must be greater than 0");
    }
    if w.lease_ttl < Duration::from_secs(3) {
        return bad("worker.lease_ttl", "must be at least 3s");
    }
    for (key, d) in [
        ("worker.idle_timeout", w.idle_timeout),
        ("worker.turn_timeout", w.turn_timeout),
        ("worker.stall_timeout", w.stall_timeout),
    ] {
        if d.is_zero() {
            return bad(key, "must be greater than 0");
        }
    }
    if s.database.max_connections == 0 {
        return bad("database.max_connections", "must be greater than 0");
    }
    if let Some(url) = &s.database_url
        && !(url.expose().starts_with("postgres://") || url.expose().starts_with("postgresql://"))
    {
        return bad("database_url", "must be a postgres:// or postgresql:// URL");
    }
    if let Some(key) = &s.bootstrap_key
        && key.expose().len() < 16
    {
        return bad("bootstrap_key", "must be at least 16 characters long");
    }
    for dir in &s.allowed_work_dirs {
        if !dir.is_absolute() {
            return bad("allowed_work_dirs", "entries must be absolute paths");
        }
    }
    if let Some(root) = &s.work_root
        && !root.is_absolute()
    {
        return bad("work_root", "must be an absolute path");
    }
    for origin in &s.http.cors_allowed_origins {
        if origin != "*" && axum::http::HeaderValue::from_str(origin).is_err() {
            return bad("http.cors_allowed_origins", "contains an invalid origin");
        }
    }
    if tracing_subscriber::EnvFilter::try_new(&s.log_level).is_err() {
        return bad(
            "log_level",
            "is not a valid filter (e.g. `info` or `hotplex=debug`)",
        );
    }
    // Loads the key material too, so that a bad key file stops the start (and shows in
    // `hotplex config validate`), not the first request.
    if let Some(jwt) = &s.auth.jwt {
        crate::auth::jwt::Verifier::new(jwt).map_err(|e| Error::Invalid(e.to_string()))?;
    }
    // Compiles the rules, so that a bad pattern names its key at start.
    crate::waf::Waf::new(&s.waf).map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(())
}

/// The merged settings as YAML, with secrets redacted.
pub fn render(settings: &Settings) -> String {
    serde_yaml::to_string(settings).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> (tempfile::TempDir, ConfigFile) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hotplex.yaml");
        std::fs::write(&path, text).expect("write");
        (dir, ConfigFile::Explicit(path))
    }

    #[test]
    fn defaults_apply_without_sources() {
        let loaded = load_from(&ConfigFile::Default, &Overrides::default(), env(&[])).unwrap();
        assert_eq!(loaded.settings.listen.to_string(), "127.0.0.1:8080");
        assert!(loaded.settings.database_url.is_none());
        assert_eq!(
            loaded.settings.providers.claude_code.binary,
            PathBuf::from("claude")
        );
    }

    #[test]
    fn precedence_is_defaults_file_env_flags() {
        let (_d, f) =
            file("listen: 127.0.0.1:9000\ndata_dir: /from/file\nhttp:\n  body_limit: 10\n");
        let loaded = load_from(&f, &Overrides::default(), env(&[])).unwrap();
        assert_eq!(loaded.settings.listen.port(), 9000);
        assert_eq!(loaded.settings.data_dir, PathBuf::from("/from/file"));

        let e = env(&[
            ("HOTPLEX_LISTEN", "127.0.0.1:9001"),
            ("HOTPLEX_HTTP__BODY_LIMIT", "20"),
        ]);
        let loaded = load_from(&f, &Overrides::default(), e.clone()).unwrap();
        assert_eq!(loaded.settings.listen.port(), 9001);
        assert_eq!(loaded.settings.http.body_limit, 20);
        assert_eq!(loaded.settings.data_dir, PathBuf::from("/from/file"));

        let flags = Overrides {
            listen: Some("127.0.0.1:9002".parse().unwrap()),
            data_dir: Some("/from/flag".into()),
            log_format: None,
        };
        let loaded = load_from(&f, &flags, e).unwrap();
        assert_eq!(loaded.settings.listen.port(), 9002);
        assert_eq!(loaded.settings.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(loaded.settings.http.body_limit, 20);
    }

    #[test]
    fn nested_env_keys_split_on_double_underscore() {
        let e = env(&[
            ("HOTPLEX_PROVIDERS__CLAUDE_CODE__BINARY", "/opt/claude"),
            ("HOTPLEX_PROVIDERS__CLAUDE_CODE__ENV__FOO_BAR", "baz"),
            (
                "HOTPLEX_PROVIDERS__CLAUDE_CODE__ENV__DISABLE_TELEMETRY",
                "1",
            ),
            ("HOTPLEX_HTTP__REQUEST_TIMEOUT", "45s"),
        ]);
        let s = load_from(&ConfigFile::Default, &Overrides::default(), e)
            .unwrap()
            .settings;
        assert_eq!(s.providers.claude_code.binary, PathBuf::from("/opt/claude"));
        assert_eq!(
            s.providers
                .claude_code
                .env
                .get("FOO_BAR")
                .map(String::as_str),
            Some("baz")
        );
        // The child's environment keeps names and text values as given.
        assert_eq!(
            s.providers
                .claude_code
                .env
                .get("DISABLE_TELEMETRY")
                .map(String::as_str),
            Some("1")
        );
        assert_eq!(s.http.request_timeout, Duration::from_secs(45));
    }

    #[test]
    fn database_url_from_plain_env_and_prefixed_wins() {
        let e = env(&[("DATABASE_URL", "postgres://a@h/db")]);
        let s = load_from(&ConfigFile::Default, &Overrides::default(), e)
            .unwrap()
            .settings;
        assert_eq!(s.database_url.unwrap().expose(), "postgres://a@h/db");
        let e = env(&[
            ("DATABASE_URL", "postgres://a@h/db"),
            ("HOTPLEX_DATABASE_URL", "postgres://b@h/db"),
        ]);
        let s = load_from(&ConfigFile::Default, &Overrides::default(), e)
            .unwrap()
            .settings;
        assert_eq!(s.database_url.unwrap().expose(), "postgres://b@h/db");
    }

    #[test]
    fn unknown_env_is_a_warning_and_unknown_file_key_an_error() {
        let e = env(&[("HOTPLEX_NO_SUCH_THING", "1"), ("HOTPLEX_CONFIG", "x")]);
        let loaded = load_from(&ConfigFile::Default, &Overrides::default(), e).unwrap();
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
        assert!(loaded.warnings[0].contains("HOTPLEX_NO_SUCH_THING"));

        let (_d, f) = file("lisen: 127.0.0.1:1\n");
        let err = load_from(&f, &Overrides::default(), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen"), "{err}");
        assert!(err.contains("hotplex.yaml"), "{err}");
    }

    #[test]
    fn errors_name_source_key_and_reason() {
        let e = env(&[("HOTPLEX_HTTP__BODY_LIMIT", "lots")]);
        let err = load_from(&ConfigFile::Default, &Overrides::default(), e)
            .unwrap_err()
            .to_string();
        assert!(err.contains("HOTPLEX_HTTP__BODY_LIMIT"), "{err}");
        assert!(err.contains("http.body_limit"), "{err}");

        let (_d, f) = file("listen: not-an-address\n");
        let err = load_from(&f, &Overrides::default(), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key `listen`") && err.contains("hotplex.yaml"),
            "{err}"
        );

        let err = load_from(
            &ConfigFile::Explicit("/nonexistent/x.yaml".into()),
            &Overrides::default(),
            env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/nonexistent/x.yaml") && err.contains("no such file"),
            "{err}"
        );

        let e = env(&[("DATABASE_URL", "mysql://x")]);
        let err = load_from(&ConfigFile::Default, &Overrides::default(), e)
            .unwrap_err()
            .to_string();
        assert!(err.contains("database_url"), "{err}");
    }

    #[test]
    fn secrets_are_redacted_in_render_and_debug() {
        let e = env(&[
            ("DATABASE_URL", "postgres://user:hunter2@h/db"),
            ("HOTPLEX_BOOTSTRAP_KEY", "hpx_supersecretvalue123"),
        ]);
        let s = load_from(&ConfigFile::Default, &Overrides::default(), e)
            .unwrap()
            .settings;
        let text = render(&s);
        assert!(
            !text.contains("hunter2") && !text.contains("supersecret"),
            "{text}"
        );
        assert!(text.contains("[redacted]"));
        let debug = format!("{s:?}");
        assert!(!debug.contains("hunter2") && !debug.contains("supersecret"));
    }

    #[test]
    fn shipped_config_file_is_valid_and_documents_every_key() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        load_from(&ConfigFile::Explicit(path), &Overrides::default(), env(&[])).unwrap();
        fn walk(prefix: &str, dict: &Dict, out: &mut Vec<String>) {
            for (k, v) in dict {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v {
                    Value::Dict(_, d) if !d.is_empty() => walk(&key, d, out),
                    _ => out.push(key),
                }
            }
        }
        let mut keys = Vec::new();
        walk("", &known_keys(), &mut keys);
        for key in keys.iter().map(|k| k.rsplit('.').next().unwrap_or(k)) {
            assert!(
                text.contains(&format!("{key}:")),
                "configs/hotplex.yaml lacks `{key}`"
            );
        }
        for key in [
            "database_url",
            "bootstrap_key",
            "work_root",
            "bin_dir",
            "run_as",
        ]
        .iter()
        .chain(JWT_KEYS)
        {
            assert!(
                text.contains(&format!("{key}:")),
                "configs/hotplex.yaml lacks `{key}`"
            );
        }
    }

    #[test]
    fn jwt_settings_come_from_env_as_text_with_the_secret_redacted() {
        let e = env(&[
            ("HOTPLEX_AUTH__JWT__ISSUER", "https://idp.example"),
            ("HOTPLEX_AUTH__JWT__AUDIENCE", "12345"),
            ("HOTPLEX_AUTH__JWT__ALGORITHM", "HS256"),
            (
                "HOTPLEX_AUTH__JWT__HS256_SECRET",
                "12345678901234567890123456789012345",
            ),
            ("HOTPLEX_AUTH__JWT__LEEWAY", "10s"),
            ("HOTPLEX_AUTH__JWT__AUTO_CREATE_TENANTS", "true"),
        ]);
        let loaded = load_from(&ConfigFile::Default, &Overrides::default(), e).unwrap();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let jwt = loaded.settings.auth.jwt.clone().unwrap();
        assert_eq!(jwt.issuer, "https://idp.example");
        assert_eq!(jwt.audience, "12345");
        assert_eq!(jwt.algorithm, JwtAlgorithm::HS256);
        assert_eq!(jwt.leeway, Duration::from_secs(10));
        assert_eq!(jwt.tenant_claim, "tenant");
        assert!(jwt.auto_create_tenants);
        assert_eq!(
            jwt.hs256_secret.as_ref().map(Secret::expose),
            Some("12345678901234567890123456789012345")
        );
        let text = render(&loaded.settings);
        assert!(
            !text.contains("1234567890123456789") && text.contains("[redacted]"),
            "{text}"
        );
        assert!(!format!("{:?}", loaded.settings).contains("1234567890123456789"));
        assert!(
            load_from(&ConfigFile::Default, &Overrides::default(), env(&[]))
                .unwrap()
                .settings
                .auth
                .jwt
                .is_none()
        );
    }

    #[test]
    fn a_bad_jwt_key_file_is_named_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("idp.pem");
        std::fs::write(&pem, "not a key").unwrap();
        let (_d, f) = file(&format!(
            "auth:\n  jwt:\n    issuer: https://idp.example\n    audience: hotplex\n    \
             algorithm: RS256\n    public_key_pem: {}\n",
            pem.display()
        ));
        let err = load_from(&f, &Overrides::default(), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("auth.jwt.public_key_pem") && err.contains("idp.pem"),
            "{err}"
        );
        std::fs::remove_file(&pem).unwrap();
        let err = load_from(&f, &Overrides::default(), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("auth.jwt.public_key_pem") && err.contains("idp.pem"),
            "{err}"
        );
        let e = env(&[("HOTPLEX_AUTH__JWT__LEEWAY", "2m")]);
        let err = load_from(&f, &Overrides::default(), e)
            .unwrap_err()
            .to_string();
        assert!(err.contains("auth.jwt.leeway"), "{err}");
        let e = env(&[("HOTPLEX_AUTH__JWT__ALGORITHM", "none")]);
        let err = load_from(&f, &Overrides::default(), e)
            .unwrap_err()
            .to_string();
        assert!(err.contains("algorithm"), "{err}");
    }
}
