//! The OpenCode-compatible API: framing byte for byte, the prompt flows and the message
//! model with the fake agent, errors and auth; then the real `@opencode-ai/sdk` (v1 and v2)
//! and `opencode run --attach` against hotplex fronting the real Claude Code CLI, with the
//! same SDK checks first proven against the real `opencode serve`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::support::TestApp;

/// Frames of an OpenCode event stream, read raw.
struct Frames {
    response: reqwest::Response,
    buf: Vec<u8>,
    /// Every byte received, for the CRLF check.
    all: Vec<u8>,
}

impl Frames {
    fn new(response: reqwest::Response) -> Self {
        Self {
            response,
            buf: Vec::new(),
            all: Vec::new(),
        }
    }

    /// The next `data: …\n\n` frame, exactly as sent (with its framing).
    async fn next_raw(&mut self, within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.buf.drain(..end + 2).collect();
                return String::from_utf8(frame).expect("UTF-8 frame");
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .expect("no frame in time")
                .expect("stream error")
                .expect("stream ended");
            self.buf.extend_from_slice(&chunk);
            self.all.extend_from_slice(&chunk);
        }
    }

    async fn next(&mut self, within: Duration) -> Value {
        let raw = self.next_raw(within).await;
        let json = raw
            .strip_prefix("data: ")
            .and_then(|r| r.strip_suffix("\n\n"))
            .unwrap_or_else(|| panic!("not an OpenCode frame: {raw:?}"));
        assert!(!json.contains('\n'), "multi-line data: {raw:?}");
        serde_json::from_str(json).expect("JSON event")
    }

    /// Events until one matches `stop` (included).
    async fn until(&mut self, stop: impl Fn(&Value) -> bool, within: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let ev = self.next(left).await;
            let done = stop(&ev);
            out.push(ev);
            if done {
                return out;
            }
        }
    }
}

fn basic(key: &str) -> String {
    let creds = base64::engine::general_purpose::STANDARD.encode(format!("opencode:{key}"));
    format!("Basic {creds}")
}

/// A request with OpenCode's Basic auth and, optionally, its directory header.
fn oc(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    dir: Option<&str>,
) -> reqwest::RequestBuilder {
    let mut r = app
        .client
        .request(method, app.url(path))
        .header("authorization", basic(&app.admin_key));
    if let Some(d) = dir {
        let enc = percent_encoding::utf8_percent_encode(d, percent_encoding::NON_ALPHANUMERIC);
        r = r.header("x-opencode-directory", enc.to_string());
    }
    r
}

/// Sends the request; its JSON body.
async fn json_of(r: reqwest::RequestBuilder) -> Value {
    r.send().await.unwrap().json().await.unwrap()
}

fn is_event_id(id: &str) -> bool {
    id.len() == 30
        && id.starts_with("evt_")
        && id[4..16].bytes().all(|b| b.is_ascii_hexdigit())
        && id[16..].bytes().all(|b| b.is_ascii_alphanumeric())
}

#[tokio::test]
async fn event_streams_are_framed_like_opencode_byte_for_byte() {
    let app = TestApp::spawn().await;
    let response = oc(&app, reqwest::Method::GET, "/event", None)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let h = response.headers();
    assert_eq!(h["content-type"], "text/event-stream");
    assert_eq!(h["cache-control"], "no-cache, no-transform");
    assert_eq!(h["x-accel-buffering"], "no");
    let mut frames = Frames::new(response);
    // The very first bytes: `data: {"id":"evt_…","properties":{},"type":"server.connected"}` + LF LF.
    let first = frames.next_raw(Duration::from_secs(5)).await;
    let v: Value = serde_json::from_str(&first[6..first.len() - 2]).unwrap();
    assert_eq!(
        first,
        format!(
            "data: {}\n\n",
            json!({"id": v["id"], "properties": {}, "type": "server.connected"})
        )
    );
    assert!(is_event_id(v["id"].as_str().unwrap()), "{first}");
    // The heartbeat, 10 s later, framed the same way.
    let beat = frames.next_raw(Duration::from_secs(12)).await;
    let b: Value = serde_json::from_str(&beat[6..beat.len() - 2]).unwrap();
    assert_eq!(
        beat,
        format!(
            "data: {}\n\n",
            json!({"id": b["id"], "properties": {}, "type": "server.heartbeat"})
        )
    );
    assert!(!frames.all.contains(&b'\r'), "CR in the stream");

    // The global stream wraps each event in `payload`.
    let response = oc(&app, reqwest::Method::GET, "/global/event", None)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut global = Frames::new(response);
    let first = global.next_raw(Duration::from_secs(5)).await;
    let v: Value = serde_json::from_str(&first[6..first.len() - 2]).unwrap();
    assert_eq!(
        first,
        format!(
            "data: {}\n\n",
            json!({"payload": {"id": v["payload"]["id"], "properties": {}, "type": "server.connected"}})
        )
    );
    assert!(!global.all.contains(&b'\r'));
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or(""))
        .collect()
}

#[tokio::test]
async fn prompts_stream_as_opencode_events_and_read_back_as_messages() {
    let app = TestApp::spawn_with_worker(|_| {}).await;
    let dir = "/srv/project-a";
    let mut events = Frames::new(
        oc(&app, reqwest::Method::GET, "/event", Some(dir))
            .send()
            .await
            .unwrap(),
    );
    assert_eq!(
        events.next(Duration::from_secs(5)).await["type"],
        "server.connected"
    );
    let mut global = Frames::new(
        oc(&app, reqwest::Method::GET, "/global/event", None)
            .send()
            .await
            .unwrap(),
    );
    global.next(Duration::from_secs(5)).await;

    // A session of another directory: not on this directory's stream, nor in its list.
    let other = json_of(
        oc(&app, reqwest::Method::POST, "/session", Some("/srv/other"))
            .json(&json!({"title": "elsewhere"})),
    )
    .await;
    let session =
        json_of(oc(&app, reqwest::Method::POST, "/session", Some(dir)).json(
            &json!({"title": "mine", "model": {"providerID": "claude-code", "id": "default"}}),
        ))
        .await;
    let sid = session["id"].as_str().unwrap().to_owned();
    assert!(sid.starts_with("ses_") && sid.len() == 30, "{session}");
    assert_eq!(session["title"], "mine");
    assert_eq!(session["directory"], dir);
    // Newer sessions sort first (their ids count down).
    assert!(sid.as_str() < other["id"].as_str().unwrap());
    let created = events.next(Duration::from_secs(5)).await;
    assert_eq!(created["type"], "session.created");
    assert_eq!(created["properties"]["info"]["id"], sid.as_str());
    let listed = json_of(oc(
        &app,
        reqwest::Method::GET,
        &format!("/session?directory={dir}"),
        None,
    ))
    .await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    // The native API sees the same session.
    let native = app.get_json("/v1/sessions").await;
    assert!(
        native["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["opencode_id"] == sid.as_str())
    );

    // prompt_async: 204 with an empty body at once.
    let r = oc(&app, reqwest::Method::POST, &format!("/session/{sid}/prompt_async"), Some(dir))
        .json(&json!({"parts": [{"type": "text", "text": "hello"}], "messageID": "msg_00000000000100000000000000"}))
        .send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.bytes().await.unwrap().is_empty());
    let turn = events
        .until(|e| e["type"] == "session.idle", Duration::from_secs(30))
        .await;
    // (The agent's deltas may arrive as one coalesced event or several: one run of them.)
    let mut shape = kinds(&turn);
    shape.dedup_by(|a, b| *a == "message.part.delta" && *b == "message.part.delta");
    assert_eq!(
        shape,
        [
            "session.status",
            "message.updated",
            "message.part.updated",
            "message.updated",
            "message.part.updated",
            "message.part.updated",
            "message.part.delta",
            "message.part.updated",
            "message.part.updated",
            "message.updated",
            "session.status",
            "session.idle",
        ],
        "{turn:#?}"
    );
    assert!(
        turn.iter()
            .all(|e| e["properties"]["sessionID"] == sid.as_str())
    );
    assert_eq!(
        turn[1]["properties"]["info"]["id"],
        "msg_00000000000100000000000000"
    );
    let deltas: Vec<&Value> = turn
        .iter()
        .filter(|e| e["type"] == "message.part.delta")
        .map(|e| &e["properties"])
        .collect();
    let n = turn.len();
    let final_text = &turn[n - 5]["properties"]["part"];
    assert!(deltas.iter().all(|d| d["partID"] == final_text["id"]));
    let streamed: String = deltas.iter().filter_map(|d| d["delta"].as_str()).collect();
    assert_eq!(streamed, final_text["text"].as_str().unwrap());
    assert!(
        final_text["text"]
            .as_str()
            .unwrap()
            .starts_with("FAKE-ECHO(turn 1): hello")
    );
    let done = &turn[n - 3]["properties"]["info"];
    assert_eq!(done["finish"], "stop");
    assert_eq!(done["parentID"], "msg_00000000000100000000000000");
    assert!(done["tokens"]["output"].as_i64().unwrap() > 0 && done["time"]["completed"].is_i64());
    // The global stream carried the same events, wrapped, with their directory.
    let wrapped = global
        .until(
            |e| e["payload"]["type"] == "session.idle",
            Duration::from_secs(10),
        )
        .await;
    let mine: Vec<&Value> = wrapped
        .iter()
        .filter(|e| e["payload"]["properties"]["sessionID"] == sid.as_str())
        .collect();
    assert_eq!(mine.len(), turn.len() + 1, "{wrapped:#?}"); // + session.created
    assert!(
        mine.iter()
            .all(|e| e["directory"] == dir && e["project"] == "global")
    );

    // The blocking prompt answers with the last assistant message.
    let reply = json_of(
        oc(
            &app,
            reqwest::Method::POST,
            &format!("/session/{sid}/message"),
            Some(dir),
        )
        .json(&json!({"parts": [{"type": "text", "text": "again"}]})),
    )
    .await;
    assert_eq!(reply["info"]["role"], "assistant");
    let types: Vec<&str> = reply["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["step-start", "text", "step-finish"]);
    assert!(
        reply["parts"][1]["text"]
            .as_str()
            .unwrap()
            .starts_with("FAKE-ECHO(turn 2): again")
    );

    // (This stream saw that turn too.)
    events
        .until(|e| e["type"] == "session.idle", Duration::from_secs(30))
        .await;

    // Messages read back: user, assistant, user, assistant, with ascending ids.
    let messages = json_of(oc(
        &app,
        reqwest::Method::GET,
        &format!("/session/{sid}/message"),
        None,
    ))
    .await;
    let roles: Vec<&str> = messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["info"]["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_eq!(messages[0]["parts"][0]["text"], "hello");
    assert_eq!(messages[3]["info"]["id"], reply["info"]["id"]);
    let ids: Vec<&str> = messages.as_array().unwrap()[1..]
        .iter()
        .map(|m| m["info"]["id"].as_str().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let one = json_of(oc(
        &app,
        reqwest::Method::GET,
        &format!("/session/{sid}/message/{}", ids[0]),
        None,
    ))
    .await;
    assert_eq!(one["info"]["id"], ids[0]);
    let last = json_of(oc(
        &app,
        reqwest::Method::GET,
        &format!("/session/{sid}/message?limit=1"),
        None,
    ))
    .await;
    assert_eq!(last.as_array().unwrap().len(), 1);

    // Abort mid-stream: MessageAbortedError, then idle; the session goes on.
    oc(
        &app,
        reqwest::Method::POST,
        &format!("/session/{sid}/prompt_async"),
        Some(dir),
    )
    .json(&json!({"parts": [{"type": "text", "text": "[[slow]] go"}]}))
    .send()
    .await
    .unwrap();
    events
        .until(
            |e| e["type"] == "message.part.delta",
            Duration::from_secs(30),
        )
        .await;
    let status = json_of(oc(&app, reqwest::Method::GET, "/session/status", Some(dir))).await;
    assert_eq!(status, json!({ sid.as_str(): {"type": "busy"} }));
    let aborted = json_of(oc(
        &app,
        reqwest::Method::POST,
        &format!("/session/{sid}/abort"),
        Some(dir),
    ))
    .await;
    assert_eq!(aborted, json!(true));
    let rest = events
        .until(|e| e["type"] == "session.idle", Duration::from_secs(30))
        .await;
    let err = rest
        .iter()
        .find(|e| e["type"] == "session.error")
        .expect("session.error");
    assert_eq!(err["properties"]["error"]["name"], "MessageAbortedError");
    let info = rest
        .iter()
        .rev()
        .find(|e| e["type"] == "message.updated")
        .unwrap();
    assert_eq!(
        info["properties"]["info"]["error"]["name"],
        "MessageAbortedError"
    );
    assert!(info["properties"]["info"]["time"]["completed"].is_i64());

    // Update and delete.
    let renamed = json_of(
        oc(
            &app,
            reqwest::Method::PATCH,
            &format!("/session/{sid}"),
            Some(dir),
        )
        .json(&json!({"title": "renamed"})),
    )
    .await;
    assert_eq!(renamed["title"], "renamed");
    let updated = events
        .until(|e| e["type"] == "session.updated", Duration::from_secs(5))
        .await;
    assert_eq!(
        updated.last().unwrap()["properties"]["info"]["title"],
        "renamed"
    );
    let deleted = json_of(oc(
        &app,
        reqwest::Method::DELETE,
        &format!("/session/{sid}"),
        Some(dir),
    ))
    .await;
    assert_eq!(deleted, json!(true));
    events
        .until(|e| e["type"] == "session.deleted", Duration::from_secs(5))
        .await;
    let gone = oc(&app, reqwest::Method::GET, &format!("/session/{sid}"), None)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    assert!(!events.all.contains(&b'\r'));
    // Nothing of the other directory's session reached this directory's stream.
    let other_id = other["id"].as_str().unwrap();
    assert!(!String::from_utf8_lossy(&events.all).contains(other_id));
}

#[tokio::test]
async fn errors_are_opencodes_and_auth_takes_the_key_as_basic_password() {
    let app = TestApp::spawn().await;
    let named = |status: u16, name: &'static str| {
        move |(s, body): (u16, Value)| {
            assert_eq!(s, status, "{body}");
            assert_eq!(body["name"], name, "{body}");
            assert!(body["data"]["message"].is_string(), "{body}");
            assert!(body["error"]["code"].is_string(), "{body}");
        }
    };
    async fn call(r: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }
    named(404, "NotFoundError")(
        call(oc(&app, reqwest::Method::GET, "/session/ses_nope", None)).await,
    );
    let (_, body) = call(oc(&app, reqwest::Method::GET, "/session/ses_nope", None)).await;
    assert_eq!(body["data"]["message"], "Session not found: ses_nope");
    named(404, "NotFoundError")(call(oc(&app, reqwest::Method::GET, "/tui/nothing", None)).await);
    named(400, "BadRequest")(call(oc(&app, reqwest::Method::GET, "/session/nope", None)).await);

    let session = json_of(oc(&app, reqwest::Method::POST, "/session", None)).await;
    assert!(
        session["title"]
            .as_str()
            .unwrap()
            .starts_with("New session - ")
    );
    let sid = session["id"].as_str().unwrap();
    let (_, body) = call(
        oc(
            &app,
            reqwest::Method::POST,
            &format!("/session/{sid}/message"),
            None,
        )
        .json(&json!({})),
    )
    .await;
    assert_eq!(body["data"]["message"], "Missing key\n  at [\"parts\"]");
    for bad in [
        json!({"parts": [{"type": "bogus"}]}),
        json!({"parts": [{"type": "text", "text": "  "}]}),
        json!({"parts": [{"type": "text", "text": "x"}], "messageID": "nope"}),
    ] {
        named(400, "BadRequest")(
            call(
                oc(
                    &app,
                    reqwest::Method::POST,
                    &format!("/session/{sid}/prompt_async"),
                    None,
                )
                .json(&bad),
            )
            .await,
        );
    }
    named(400, "BadRequest")(
        call(
            oc(&app, reqwest::Method::POST, "/session", None)
                .header("content-type", "application/json")
                .body("{"),
        )
        .await,
    );
    named(400, "BadRequest")(
        call(
            oc(&app, reqwest::Method::POST, "/session", None)
                .json(&json!({"model": {"providerID": "nope", "id": "x"}})),
        )
        .await,
    );
    named(400, "BadRequest")(
        call(oc(
            &app,
            reqwest::Method::GET,
            "/event?directory=relative",
            None,
        ))
        .await,
    );
    // Nothing was enqueued by the bad prompts.
    let turns: i64 = sqlx::query_scalar("select count(*) from turns")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(turns, 0);

    // Auth: none → 401 with a Basic challenge; a wrong key → 401; bearer works too.
    let resp = app.client.get(app.url("/session")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["www-authenticate"],
        "Basic realm=\"hotplex\""
    );
    named(401, "Unauthorized")((401, resp.json().await.unwrap()));
    let wrong = app
        .client
        .get(app.url("/config"))
        .header("authorization", basic("hpx_wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let ok = app.get("/config", &app.admin_key).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    // Health answers without a key.
    let health: Value = app
        .client
        .get(app.url("/global/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health, json!({"healthy": true, "version": "1.18.33"}));
    // Another tenant does not see the session.
    let other = app.user_key("other").await;
    let r = app
        .client
        .get(app.url(&format!("/session/{sid}")))
        .header("authorization", basic(&other))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // The start-up routes of the TUI answer with the right shapes.
    let get = |p: &'static str| {
        let r = oc(&app, reqwest::Method::GET, p, Some("/srv/x"));
        async move { r.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let providers = get("/config/providers").await;
    assert_eq!(providers["default"]["claude-code"], "default");
    assert!(providers["providers"][0]["models"]["sonnet"]["limit"]["context"].is_i64());
    let provider = get("/provider").await;
    assert!(provider["all"].is_array() && provider["connected"].is_array());
    assert!(
        get("/agent")
            .await
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "build" && a["mode"] == "primary")
    );
    assert_eq!(get("/config").await["model"], "claude-code/default");
    assert_eq!(get("/path").await["directory"], "/srv/x");
    assert_eq!(get("/project/current").await["id"], "global");
    assert!(get("/vcs").await.is_object());
    for p in [
        "/command",
        "/lsp",
        "/formatter",
        "/permission",
        "/question",
        "/file/status",
    ] {
        assert_eq!(get(p).await, json!([]), "{p}");
    }
    for p in ["/mcp", "/provider/auth", "/session/status"] {
        assert_eq!(get(p).await, json!({}), "{p}");
    }
}

/// `node_modules` holding `@opencode-ai/sdk` (installed by `.ci/run` beside the CLIs).
fn node_modules() -> Option<PathBuf> {
    let dir = std::env::var_os("HOTPLEX_TEST_NODE_MODULES")
        .map(PathBuf::from)
        .or_else(|| {
            let bin = PathBuf::from(std::env::var_os("HOTPLEX_TEST_OPENCODE")?);
            Some(bin.parent()?.parent()?.to_path_buf())
        })?;
    dir.join("@opencode-ai/sdk/package.json")
        .exists()
        .then_some(dir)
}

/// The SDK check script in a temp dir that resolves `@opencode-ai/sdk` from `modules`.
fn sdk_script(modules: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/opencode/sdk-check.mjs");
    std::fs::copy(src, dir.path().join("sdk-check.mjs")).unwrap();
    std::os::unix::fs::symlink(modules, dir.path().join("node_modules")).unwrap();
    dir
}

/// Runs the SDK flows against `url`; panics with the script's output on failure.
async fn run_sdk_check(url: &str, key: &str, expect: &str, extra: &[(&str, &str)]) {
    let modules = node_modules().expect("node_modules with @opencode-ai/sdk");
    let dir = sdk_script(&modules);
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("sdk-check.mjs")
        .current_dir(dir.path())
        .env("HOTPLEX_URL", url)
        .env("HOTPLEX_KEY", key)
        .env("EXPECT", expect)
        .kill_on_drop(true);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(240), cmd.output())
        .await
        .expect("the SDK check timed out")
        .expect("node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK check failed ({:?}):\n{stdout}\n{}",
        extra,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.contains("\"ok\":true")).count(),
        4,
        "{stdout}"
    );
}

/// Whether the real-client tests can run here; in CI a missing piece fails instead.
fn real_clients() -> Option<(PathBuf, PathBuf)> {
    let bin = crate::support::real_cli("HOTPLEX_TEST_OPENCODE")?;
    match node_modules() {
        Some(modules) => Some((bin, modules)),
        None if std::env::var_os("CI").is_some() => {
            panic!("CI needs @opencode-ai/sdk beside the OpenCode CLI (installed by .ci/run)")
        }
        None => {
            eprintln!("skipping: install @opencode-ai/sdk beside the OpenCode CLI");
            None
        }
    }
}

/// Runs `opencode run --attach URL --password KEY ARGS…` with a HOME of its own in a fresh
/// project directory; its stdout (it must exit 0).
pub(crate) async fn run_attach(opencode: &Path, url: &str, key: &str, args: &[&str]) -> String {
    let home = tempfile::tempdir().unwrap();
    let project = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(opencode);
    isolate(&mut cmd, home.path());
    cmd.args(["run", "--attach", url, "--password", key])
        .args(args)
        .current_dir(project.path())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("opencode run timed out")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// [`run_attach`] with `--format json`: the text of the reply's `text` line.
pub(crate) async fn run_attach_text(
    opencode: &Path,
    url: &str,
    key: &str,
    args: &[&str],
) -> String {
    let mut all = vec!["--format", "json"];
    all.extend_from_slice(args);
    let stdout = run_attach(opencode, url, key, &all).await;
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["type"] == "text")
        .and_then(|l| l["part"]["text"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no text line in {stdout}"))
}

/// An isolated HOME/XDG and the offline switches of docs/opencode.md, for an OpenCode
/// process (server or client).
fn isolate(cmd: &mut tokio::process::Command, home: &Path) {
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_DATA_HOME", home.join(".local/share"))
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .env("XDG_STATE_HOME", home.join(".local/state"))
        .env("npm_config_registry", "http://127.0.0.1:9/");
    for k in [
        "OPENCODE_DISABLE_AUTOUPDATE",
        "OPENCODE_DISABLE_MODELS_FETCH",
        "OPENCODE_DISABLE_DEFAULT_PLUGINS",
        "OPENCODE_DISABLE_LSP_DOWNLOAD",
        "OPENCODE_DISABLE_SHARE",
        "OPENCODE_DISABLE_CLAUDE_CODE",
    ] {
        cmd.env(k, "1");
    }
}

#[tokio::test]
async fn the_real_sdk_and_opencode_run_drive_hotplex_fronting_claude_code() {
    let Some((opencode, _)) = real_clients() else {
        return;
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mock = hotplex::mock_llm::anthropic::start(listener, Default::default())
        .await
        .unwrap();
    let Some(app) = TestApp::spawn_with_real_claude(&mock.base_url()).await else {
        return;
    };
    let url = app.url("");
    run_sdk_check(&url, &app.admin_key, "MOCK-ECHO: ", &[("ECHO", "1")]).await;
    run_sdk_check(
        &url,
        &app.admin_key,
        "MOCK-ECHO: ",
        &[("ECHO", "1"), ("DIRECTORY", "/srv/sdk-project")],
    )
    .await;

    // `opencode run --attach` prints the reply (and its JSON parts), with its own HOME.
    let text = run_attach_text(
        &opencode,
        &url,
        &app.admin_key,
        &["hello", "from", "opencode"],
    )
    .await;
    assert_eq!(text, "MOCK-ECHO: hello from opencode");
    // The plain format prints just the reply.
    let out = run_attach(&opencode, &url, &app.admin_key, &["second", "prompt"]).await;
    assert!(out.contains("MOCK-ECHO: second prompt"), "{out}");
}

#[tokio::test]
async fn the_sdk_checks_hold_against_the_real_opencode_serve() {
    // The baseline: the same SDK script passes against OpenCode itself (on the mock
    // chat-completions server), so what it checks is OpenCode's behaviour, not ours.
    let Some((opencode, _)) = real_clients() else {
        return;
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mock = hotplex::mock_llm::openai::start(listener, Default::default())
        .await
        .unwrap();
    let home = tempfile::tempdir().unwrap();
    let project = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = json!({
        "provider": {"mock": {"npm": "@ai-sdk/openai-compatible", "name": "Mock",
            "options": {"baseURL": format!("{}/v1", mock.base_url()), "apiKey": "x"},
            "models": {"mock-model": {"name": "Mock Model", "limit": {"context": 128000, "output": 4096}}}}},
        "model": "mock/mock-model", "small_model": "mock/mock-model",
        "autoupdate": false, "share": "disabled",
    });
    let mut cmd = tokio::process::Command::new(&opencode);
    isolate(&mut cmd, home.path());
    cmd.args([
        "serve",
        "--port",
        &port.to_string(),
        "--hostname",
        "127.0.0.1",
    ])
    .env("OPENCODE_CONFIG_CONTENT", config.to_string())
    .current_dir(project.path())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(l) = lines.next_line().await.unwrap() {
            if l.contains("server listening on") {
                return;
            }
        }
        panic!("opencode serve exited");
    })
    .await
    .expect("opencode serve did not start");
    let url = format!("http://127.0.0.1:{port}");
    run_sdk_check(&url, "unused", "MOCK_REPLY: ", &[]).await;
    let _ = child.kill().await;
}

/// Text of a terminal's output with the escape sequences taken out (roughly: enough to
/// find words the TUI drew).
fn strip_ansi(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            match chars.next() {
                Some('[') => {
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() || c == '~' {
                            break;
                        }
                    }
                }
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' || (c == '\u{1b}' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                _ => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test]
async fn the_opencode_tui_completes_a_prompt_against_hotplex() {
    use std::io::{Read, Write};
    let Some((opencode, _)) = real_clients() else {
        return;
    };
    let app = TestApp::spawn_with_worker(|_| {}).await;
    let home = tempfile::tempdir().unwrap();
    let project = tempfile::tempdir().unwrap();
    // The TUI needs a terminal: a pseudo-terminal of 120×40.
    let size = nix::pty::Winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).unwrap();
    let slave = std::fs::File::from(pty.slave);
    let mut cmd = tokio::process::Command::new(&opencode);
    isolate(&mut cmd, home.path());
    cmd.env("TERM", "xterm-256color")
        .args(["attach", &app.url(""), "--password", &app.admin_key])
        .current_dir(project.path())
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let master = std::fs::File::from(pty.master);
    let mut writer = master.try_clone().unwrap();
    let screen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        // Reads everything the TUI draws and answers its terminal queries.
        let screen = screen.clone();
        let mut reader = master;
        let mut answer = writer.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let chunk = &buf[..n];
                if chunk.windows(4).any(|w| w == b"\x1b[6n") {
                    let _ = answer.write_all(b"\x1b[1;1R");
                }
                if chunk.windows(3).any(|w| w == b"\x1b[c") {
                    let _ = answer.write_all(b"\x1b[?62;c");
                }
                screen.lock().unwrap().extend_from_slice(chunk);
            }
        });
    }
    let wait_for = |needle: &'static str, secs: u64| {
        let screen = screen.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
            loop {
                let text = strip_ansi(&screen.lock().unwrap());
                if text.contains(needle) {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the TUI never showed {needle:?}; it showed:\n{}",
                    &text[text.len().saturating_sub(3000)..]
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for("Ask anything", 60).await;
    // Its model picker shows hotplex's catalogue.
    wait_for("Claude Code (hotplex)", 10).await;
    writer.write_all(b"hello from the tui").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    writer.write_all(b"\r").unwrap();
    wait_for("FAKE-ECHO(turn 1): hello from the tui", 60).await;
    let (prompt, status): (String, String) = sqlx::query_as("select prompt, status from turns")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(
        (prompt.as_str(), status.as_str()),
        ("hello from the tui", "completed")
    );
    let _ = child.kill().await;
}
