//! OpenCode's JSON shapes for what hotplex stores: sessions, the provider and model
//! catalogue, agents, tokens. Built as `serde_json::Value` because clients read them as
//! loose JSON and the shapes follow OpenCode's releases, not ours.

use std::path::Path;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::config::Settings;
use crate::domain::Provider;
use crate::events::Usage;
use crate::store::sessions::SessionRow;

/// The directory a session belongs to: its own, or the server's default.
pub fn directory_of(row: &SessionRow, default: &str) -> String {
    row.directory.clone().unwrap_or_else(|| default.to_owned())
}

/// The server's default directory (the work root), as OpenCode's `cwd`.
pub fn default_directory(settings: &Settings) -> String {
    settings.work_root().to_string_lossy().into_owned()
}

/// Milliseconds since the epoch, OpenCode's timestamp.
pub fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// The provider id and model id OpenCode shows for a session.
pub fn model_of(row: &SessionRow) -> (&'static str, String) {
    let provider = row.provider().unwrap_or_default();
    let model = row.model.clone().unwrap_or_else(|| "default".to_owned());
    (provider.as_str(), model)
}

const ADJECTIVES: &[&str] = &[
    "brave", "calm", "clever", "eager", "gentle", "glowing", "happy", "jolly", "keen", "lucky",
    "mighty", "nimble", "proud", "quiet", "swift", "witty",
];
const NOUNS: &[&str] = &[
    "badger", "comet", "eagle", "falcon", "harbor", "island", "lagoon", "meadow", "otter", "panda",
    "river", "rocket", "squid", "tiger", "valley", "wizard",
];

/// A stable two-word slug from the session id (OpenCode shows one; it carries no meaning).
pub fn slug(oc_id: &str) -> String {
    let h = oc_id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    let a = ADJECTIVES[(h as usize) % ADJECTIVES.len()];
    let n = NOUNS[((h >> 8) as usize) % NOUNS.len()];
    format!("{a}-{n}")
}

/// OpenCode's `Session`.
pub fn session(row: &SessionRow, default_dir: &str) -> Value {
    let dir = directory_of(row, default_dir);
    let title = row.title.clone().unwrap_or_else(|| {
        format!(
            "New session - {}",
            row.created_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        )
    });
    let (provider, model) = model_of(row);
    json!({
        "id": row.oc_id,
        "slug": slug(&row.oc_id),
        "projectID": "global",
        "directory": dir,
        "path": dir.trim_start_matches('/'),
        "title": title,
        "version": super::VERSION,
        "model": {"id": model, "providerID": provider},
        "time": {"created": ms(row.created_at), "updated": ms(row.updated_at)},
    })
}

/// OpenCode's `tokens` object.
pub fn tokens(u: &Usage) -> Value {
    json!({
        "total": u.input_tokens + u.output_tokens + u.cache_read_tokens + u.cache_write_tokens,
        "input": u.input_tokens,
        "output": u.output_tokens,
        "reasoning": 0,
        "cache": {"read": u.cache_read_tokens, "write": u.cache_write_tokens},
    })
}

fn model_entry(provider: &str, id: &str) -> Value {
    json!({
        "id": id,
        "providerID": provider,
        "api": {"id": id, "url": "", "npm": ""},
        "name": id,
        "family": "",
        "capabilities": {
            "temperature": false, "reasoning": false, "attachment": false, "toolcall": true,
            "input": {"text": true, "audio": false, "image": false, "video": false, "pdf": false},
            "output": {"text": true, "audio": false, "image": false, "video": false, "pdf": false},
            "interleaved": false,
        },
        "cost": {"input": 0, "output": 0, "cache": {"read": 0, "write": 0}},
        "limit": {"context": 200000, "output": 32000},
        "status": "active",
        "options": {},
        "headers": {},
        "release_date": "",
        "variants": {},
    })
}

/// OpenCode's `Provider[]`: one per hotplex provider, with the configured models.
pub fn providers(settings: &Settings) -> Vec<Value> {
    [
        (
            Provider::ClaudeCode,
            "Claude Code (hotplex)",
            &settings.providers.claude_code,
        ),
        (
            Provider::OpenCode,
            "OpenCode (hotplex)",
            &settings.providers.opencode,
        ),
    ]
    .into_iter()
    .map(|(p, name, s)| {
        let models: serde_json::Map<String, Value> = s
            .models
            .iter()
            .map(|m| (m.clone(), model_entry(p.as_str(), m)))
            .collect();
        json!({
            "id": p.as_str(), "name": name, "source": "config", "env": [], "options": {},
            "models": models,
        })
    })
    .collect()
}

/// `{providerID: default modelID}`.
pub fn default_models(settings: &Settings) -> Value {
    json!({
        Provider::ClaudeCode.as_str(): settings.providers.claude_code.models.first(),
        Provider::OpenCode.as_str(): settings.providers.opencode.models.first(),
    })
}

/// The default `provider/model` of new sessions.
pub fn default_model(settings: &Settings) -> String {
    let p = Provider::default();
    let m = match p {
        Provider::ClaudeCode => settings.providers.claude_code.models.first(),
        Provider::OpenCode => settings.providers.opencode.models.first(),
    };
    format!(
        "{}/{}",
        p.as_str(),
        m.map(String::as_str).unwrap_or("default")
    )
}

/// OpenCode's `Config` as `GET /config` shows it.
pub fn config(settings: &Settings) -> Value {
    let model = default_model(settings);
    let provider: serde_json::Map<String, Value> = providers(settings)
        .into_iter()
        .filter_map(|p| {
            let id = p.get("id")?.as_str()?.to_owned();
            let models: serde_json::Map<String, Value> = p
                .get("models")?
                .as_object()?
                .keys()
                .map(|k| (k.clone(), json!({"name": k})))
                .collect();
            Some((
                id.clone(),
                json!({"name": p.get("name")?, "models": models}),
            ))
        })
        .collect();
    json!({
        "command": {}, "plugin": [], "share": "disabled", "autoupdate": false,
        "model": model, "small_model": model, "username": "hotplex",
        "mode": {}, "agent": {}, "provider": provider,
    })
}

/// OpenCode's `Agent[]`: the primary `build` agent that every client expects, and `plan`.
pub fn agents() -> Value {
    let allow = json!([{"permission": "*", "pattern": "*", "action": "allow"}]);
    json!([
        {"name": "build", "description": "The default agent (hotplex runs the session's agent).",
         "mode": "primary", "native": true, "permission": allow, "options": {}},
        {"name": "plan", "description": "Plans without editing (passed to the agent as its persona).",
         "mode": "primary", "native": true, "permission": allow, "options": {}},
    ])
}

/// `GET /path`.
pub fn paths(settings: &Settings, directory: &str) -> Value {
    let data = settings.data_dir.to_string_lossy().into_owned();
    let home = dirs::home_dir()
        .unwrap_or_else(|| Path::new("/").to_path_buf())
        .to_string_lossy()
        .into_owned();
    json!({"home": home, "state": data, "config": data, "worktree": "/", "directory": directory})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_names_every_provider_and_a_default_model() {
        let s = Settings::default();
        let p = providers(&s);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0]["id"], "claude-code");
        assert_eq!(p[0]["models"]["sonnet"]["providerID"], "claude-code");
        assert_eq!(default_models(&s)["claude-code"], "default");
        assert_eq!(default_model(&s), "claude-code/default");
        assert_eq!(
            config(&s)["provider"]["opencode"]["models"]["default"]["name"],
            "default"
        );
        assert!(
            agents()
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["name"] == "build")
        );
        assert_eq!(slug("ses_abc"), slug("ses_abc"));
    }
}
