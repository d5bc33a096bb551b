//! The OpenCode provider end to end: sessions with `provider: "opencode"` run on the
//! worker's one supervised `opencode serve` (the real CLI, `HOTPLEX_TEST_OPENCODE`) against
//! the mock chat-completions API — warm turns on the same process with context, a tool, an
//! abort, a worker restart that resumes the OpenCode session, and a session that moves to a
//! worker with another HOME and back (its conversation restored from the PostgreSQL mirror).

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::TestApp;

async fn mock(delay: Duration) -> hotplex::mock_llm::openai::MockServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let options = hotplex::mock_llm::openai::MockOptions {
        delay,
        ..Default::default()
    };
    hotplex::mock_llm::openai::start(listener, options)
        .await
        .unwrap()
}

async fn events(app: &TestApp, sid: &str) -> Vec<(String, Value)> {
    sqlx::query_as::<_, (String, Value)>(
        "select type, payload from session_events where session_id = $1::uuid order by seq",
    )
    .bind(sid)
    .fetch_all(&app.db.pool)
    .await
    .unwrap()
}

/// The chat requests the mock saw whose messages mention `needle`.
fn requests_with(mock: &hotplex::mock_llm::openai::MockServer, needle: &str) -> Vec<Value> {
    mock.requests()
        .into_iter()
        .filter(|r| {
            r["path"]
                .as_str()
                .is_some_and(|p| p.ends_with("/chat/completions"))
        })
        .filter(|r| r["body"]["messages"].to_string().contains(needle))
        .collect()
}

/// A `/v1` session on the OpenCode provider (with `extra` settings); its id.
async fn opencode_session(app: &TestApp, extra: Value) -> String {
    let mut body = json!({"provider": "opencode", "model": "mock/mock-model"});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let created: Value = app
        .post("/v1/sessions", &app.admin_key)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["id"].as_str().unwrap().to_owned()
}

/// Posts a long prompt (80 words, streamed word by word) and waits for its first delta;
/// the turn id.
async fn start_long_turn(app: &TestApp, sid: &str) -> String {
    let long = (0..80)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let turn: Value = app
        .post(&format!("/v1/sessions/{sid}/turns"), &app.admin_key)
        .json(&json!({ "prompt": long }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let turn_id = turn["id"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while sqlx::query_scalar::<_, i64>(
        "select count(*) from session_events where turn_id = $1::uuid and type = 'text.delta'",
    )
    .bind(&turn_id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap()
        == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delta of the long turn"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    turn_id
}

/// Waits until the turn has ended (at most 120 s); the turn.
async fn ended(app: &TestApp, turn_id: &str) -> Value {
    app.ended_turn(turn_id, Duration::from_secs(120)).await
}

/// The session's last turn resumed the OpenCode session: no context was lost, and the
/// model request of `question` carried the earlier `remembered` prompt.
async fn assert_resumed_with_context(
    app: &TestApp,
    mock: &hotplex::mock_llm::openai::MockServer,
    sid: &str,
    question: &str,
    remembered: &str,
) {
    let evs = events(app, sid).await;
    let last = &evs
        .iter()
        .rev()
        .find(|(t, _)| t == "turn.started")
        .unwrap()
        .1;
    assert_eq!(last["resumed"], true, "{last}");
    assert!(!evs.iter().any(|(t, _)| t == "session.context_lost"));
    let requests = requests_with(mock, question);
    assert!(
        requests
            .iter()
            .any(|r| r["body"]["messages"].to_string().contains(remembered)),
        "{requests:#?}"
    );
}

/// Runs a prompt to its end; the finished turn. (Polled: a cold OpenCode server on a
/// loaded machine can take longer than one request may wait.)
async fn run(app: &TestApp, sid: &str, prompt: &str) -> Value {
    let turn: Value = app
        .post(&format!("/v1/sessions/{sid}/turns"), &app.admin_key)
        .json(&json!({ "prompt": prompt }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    ended(app, turn["id"].as_str().unwrap()).await
}

#[tokio::test]
async fn opencode_sessions_stay_warm_keep_context_run_tools_and_abort() {
    let mock = mock(Duration::from_millis(20)).await;
    let Some(app) = TestApp::spawn_with_real_opencode(&mock.base_url()).await else {
        return;
    };
    let sid = opencode_session(
        &app,
        json!({"agent": "build", "system_prompt": "SYSTEM-MARKER-42"}),
    )
    .await;

    let first = run(&app, &sid, "remember the word pineapple").await;
    assert_eq!(first["status"], "completed", "{first}");
    assert_eq!(first["result"], "MOCK_REPLY: remember the word pineapple");
    assert!(
        first["usage"]["input_tokens"].as_i64().unwrap() > 0,
        "{first}"
    );
    let second = run(&app, &sid, "what was the word").await;
    assert_eq!(second["status"], "completed", "{second}");
    assert_eq!(second["result"], "MOCK_REPLY: what was the word");
    // One conversation: the second request to the model carries the first turn.
    let with_second = requests_with(&mock, "what was the word");
    assert!(
        with_second
            .iter()
            .any(|r| r["body"]["messages"].to_string().contains("pineapple")),
        "{with_second:#?}"
    );
    // The session's system prompt reaches the model with every prompt.
    assert!(
        with_second.iter().all(|r| r["body"]["messages"]
            .to_string()
            .contains("SYSTEM-MARKER-42")),
        "{with_second:#?}"
    );
    // Warm: both turns ran on the same server process.
    let evs = events(&app, &sid).await;
    let pids: Vec<i64> = evs
        .iter()
        .filter(|(t, _)| t == "turn.started")
        .map(|(_, p)| p["pid"].as_i64().unwrap())
        .collect();
    assert_eq!(pids.len(), 2);
    assert_eq!(pids[0], pids[1]);
    assert!(
        evs.iter()
            .any(|(t, p)| t == "text.delta" && p["text"].as_str().unwrap().contains("pineapple"))
    );
    let session = app.get_json(&format!("/v1/sessions/{sid}")).await;
    assert_eq!(
        session["process"]["pid"].as_i64(),
        Some(pids[0]),
        "{session}"
    );

    // A tool: OpenCode's bash runs through the mock's tool call.
    let tool = run(&app, &sid, "[[bash:echo tool-ran-here]]").await;
    assert_eq!(tool["status"], "completed", "{tool}");
    let evs = events(&app, &sid).await;
    let started = evs
        .iter()
        .find(|(t, _)| t == "tool.started")
        .expect("tool.started");
    assert_eq!(started.1["name"], "bash");
    assert_eq!(started.1["input"]["command"], "echo tool-ran-here");
    let done = evs
        .iter()
        .find(|(t, _)| t == "tool.completed")
        .expect("tool.completed");
    assert!(
        done.1["output"].as_str().unwrap().contains("tool-ran-here"),
        "{done:?}"
    );
    assert!(
        tool["result"]
            .as_str()
            .unwrap()
            .starts_with("TOOL_DONE: tool-ran-here"),
        "{tool}"
    );

    // Abort mid-stream: the turn ends interrupted, the next one runs on the same process.
    let turn_id = start_long_turn(&app, &sid).await;
    let r = app
        .post(&format!("/v1/sessions/{sid}/interrupt"), &app.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let ended = ended(&app, &turn_id).await;
    assert_eq!(ended["status"], "interrupted", "{ended}");
    let after = run(&app, &sid, "after the abort").await;
    assert_eq!(after["status"], "completed", "{after}");
    assert_eq!(after["result"], "MOCK_REPLY: after the abort");
    let evs = events(&app, &sid).await;
    let last_pid = evs
        .iter()
        .rev()
        .find(|(t, _)| t == "turn.started")
        .unwrap()
        .1["pid"]
        .as_i64();
    assert_eq!(last_pid, Some(pids[0]));
}

#[tokio::test]
async fn a_new_worker_resumes_the_opencode_session() {
    let mock = mock(Duration::from_millis(5)).await;
    let Some(mut app) = TestApp::spawn_with_real_opencode(&mock.base_url()).await else {
        return;
    };
    let sid = opencode_session(&app, json!({})).await;
    let first = run(&app, &sid, "remember mango").await;
    assert_eq!(first["status"], "completed", "{first}");
    let old_pid = app.get_json(&format!("/v1/sessions/{sid}")).await["process"]["pid"].as_i64();
    // The worker stops (and its server with it); a new worker starts a new server on the
    // same HOME and picks the OpenCode session up again.
    app.worker.take().unwrap().stop().await;
    if let Some(pid) = old_pid {
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ");
        assert!(!alive, "the old OpenCode server {pid} survived its worker");
    }
    app.worker = Some(app.start_worker().await);
    let second = run(&app, &sid, "which fruit").await;
    assert_eq!(second["status"], "completed", "{second}");
    assert_resumed_with_context(&app, &mock, &sid, "which fruit", "remember mango").await;
}

/// The session's OpenCode session id (`sessions.agent_ref`).
async fn agent_ref(app: &TestApp, sid: &str) -> String {
    sqlx::query_scalar("select agent_ref from sessions where session_id = $1::uuid")
        .bind(sid)
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

/// Whether a model request for `question` carried the bash tool's result `output`.
fn carried_tool_result(
    mock: &hotplex::mock_llm::openai::MockServer,
    question: &str,
    output: &str,
) -> bool {
    requests_with(mock, question).iter().any(|r| {
        r["body"]["messages"].as_array().is_some_and(|messages| {
            messages
                .iter()
                .any(|m| m["role"] == "tool" && m["content"].to_string().contains(output))
        })
    })
}

#[tokio::test]
async fn an_opencode_session_moves_to_another_home_and_back_with_its_whole_conversation() {
    let mock = mock(Duration::from_millis(5)).await;
    let Some(mut app) = TestApp::spawn_with_real_opencode(&mock.base_url()).await else {
        return;
    };
    let sid = opencode_session(&app, json!({})).await;
    // Worker A: two turns, the second with a tool call.
    let first = run(&app, &sid, "remember the word papaya").await;
    assert_eq!(first["status"], "completed", "{first}");
    let tool = run(&app, &sid, "[[bash:echo tool-said-hello]]").await;
    assert_eq!(tool["status"], "completed", "{tool}");
    assert!(
        tool["result"]
            .as_str()
            .unwrap()
            .starts_with("TOOL_DONE: tool-said-hello"),
        "{tool}"
    );
    let opencode_id = agent_ref(&app, &sid).await;
    app.worker.take().unwrap().stop().await;
    // The conversation is in PostgreSQL: user, assistant, user, assistant (tool), assistant.
    let mirrored: i64 =
        sqlx::query_scalar("select count(*) from opencode_messages where session_id = $1::uuid")
            .bind(&sid)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(mirrored, 5);

    // Worker B has another HOME (another opencode.db) and another work root, as on another
    // host: the conversation is replayed into its server under the same OpenCode id.
    let elsewhere = tempfile::tempdir().unwrap();
    let b = app
        .start_worker_with(|s| {
            s.providers.opencode.home = Some(elsewhere.path().join("home"));
            s.work_root = Some(elsewhere.path().join("work"));
        })
        .await;
    let third = run(&app, &sid, "what came before").await;
    assert_eq!(third["status"], "completed", "{third}");
    assert_eq!(third["result"], "MOCK_REPLY: what came before");
    assert_resumed_with_context(
        &app,
        &mock,
        &sid,
        "what came before",
        "remember the word papaya",
    )
    .await;
    assert!(
        carried_tool_result(&mock, "what came before", "tool-said-hello"),
        "{:#?}",
        requests_with(&mock, "what came before")
    );
    assert_eq!(agent_ref(&app, &sid).await, opencode_id);
    assert!(
        elsewhere
            .path()
            .join("home/.local/share/opencode/opencode.db")
            .exists()
    );
    b.stop().await;

    // Back on A's HOME, whose copy stopped at the second turn: the stale copy is replaced
    // from the mirror, so the fourth turn sees the third.
    app.worker = Some(app.start_worker().await);
    let fourth = run(&app, &sid, "and what now").await;
    assert_eq!(fourth["status"], "completed", "{fourth}");
    assert_resumed_with_context(&app, &mock, &sid, "and what now", "what came before").await;
    assert_resumed_with_context(
        &app,
        &mock,
        &sid,
        "and what now",
        "remember the word papaya",
    )
    .await;
    assert!(carried_tool_result(
        &mock,
        "and what now",
        "tool-said-hello"
    ));
    assert_eq!(agent_ref(&app, &sid).await, opencode_id);
}

#[tokio::test]
async fn a_killed_server_fails_its_turn_and_the_next_turn_gets_a_new_one() {
    let mock = mock(Duration::from_millis(20)).await;
    let Some(app) = TestApp::spawn_with_real_opencode(&mock.base_url()).await else {
        return;
    };
    let sid = opencode_session(&app, json!({})).await;
    let first = run(&app, &sid, "remember kiwi").await;
    assert_eq!(first["status"], "completed", "{first}");
    let pid = app.get_json(&format!("/v1/sessions/{sid}")).await["process"]["pid"]
        .as_i64()
        .unwrap();

    // kill -9 in the middle of a streaming turn.
    let turn_id = start_long_turn(&app, &sid).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let ended = ended(&app, &turn_id).await;
    assert_eq!(ended["status"], "failed", "{ended}");
    assert!(
        ended["error"].as_str().unwrap().contains("OpenCode"),
        "{ended}"
    );

    // The next turn starts a new server and continues the same OpenCode session.
    let next = run(&app, &sid, "which fruit was it").await;
    assert_eq!(next["status"], "completed", "{next}");
    let evs = events(&app, &sid).await;
    let last = &evs
        .iter()
        .rev()
        .find(|(t, _)| t == "turn.started")
        .unwrap()
        .1;
    assert_ne!(last["pid"].as_i64(), Some(pid));
    assert_resumed_with_context(&app, &mock, &sid, "which fruit was it", "remember kiwi").await;
}

#[tokio::test]
async fn opencode_run_attaches_to_hotplex_running_the_opencode_provider() {
    // OpenCode in front and behind: the real client talks to hotplex's OpenCode API, and
    // hotplex runs the prompt on its OpenCode provider (chosen by the client's --model).
    let mock = mock(Duration::from_millis(5)).await;
    let Some(app) = TestApp::spawn_with_real_opencode(&mock.base_url()).await else {
        return;
    };
    let Some(bin) = crate::support::real_cli("HOTPLEX_TEST_OPENCODE") else {
        return;
    };
    let args = [
        "--model",
        "opencode/mock/mock-model",
        "hello",
        "both",
        "ways",
    ];
    let text = crate::opencode::run_attach_text(&bin, &app.url(""), &app.admin_key, &args).await;
    assert_eq!(text, "MOCK_REPLY: hello both ways");
    let provider: String = sqlx::query_scalar("select provider from sessions")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(provider, "opencode");
}

#[tokio::test]
async fn the_opencode_mirror_is_written_under_the_lease_and_follows_the_server() {
    use hotplex::domain::{SessionId, WorkerId};
    use hotplex::store::{leases, opencode_mirror as mirror, workers};

    fn turn<'a>(
        agent_ref: &'a str,
        info: &'a Value,
        from: Option<&'a str>,
        messages: &'a [(String, Value)],
    ) -> mirror::TurnMirror<'a> {
        mirror::TurnMirror {
            agent_ref,
            info,
            from,
            messages,
            turn_message_id: "msg_0Z",
        }
    }

    let app = TestApp::spawn().await;
    let pool = &app.db.pool;
    let session: SessionId = app.new_session(&app.admin_key).await.parse().unwrap();
    let (a, b) = (WorkerId::new_random(), WorkerId::new_random());
    workers::register(pool, a, "host-a", 1, 4, None)
        .await
        .unwrap();
    workers::register(pool, b, "host-b", 2, 4, None)
        .await
        .unwrap();
    let ttl = Duration::from_secs(30);
    let fence_a = leases::claim(pool, session, a, ttl).await.unwrap().unwrap();
    let message = |id: &str, text: &str| {
        (
            id.to_owned(),
            json!({"info": {"id": id}, "parts": [{"text": text}]}),
        )
    };
    let ids = |s: &mirror::Snapshot| -> Vec<String> {
        s.messages
            .iter()
            .map(|m| m["info"]["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let info = json!({"id": "ses_one", "title": "t"});
    // Byte order, as OpenCode orders its ids ('Z' sorts before 'a').
    let first = [
        message("msg_0a", "one"),
        message("msg_0Z", "two"),
        message("msg_1", "three"),
    ];
    assert!(
        mirror::write_turn(pool, session, fence_a, turn("ses_one", &info, None, &first))
            .await
            .unwrap()
    );
    let head = mirror::head(pool, session).await.unwrap().unwrap();
    assert_eq!(head.agent_ref, "ses_one");
    assert_eq!(head.turn_message_id.as_deref(), Some("msg_0Z"));
    assert_eq!(head.last_message_id.as_deref(), Some("msg_1"));
    let snap = mirror::snapshot(pool, session, "ses_one")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids(&snap), ["msg_0Z", "msg_0a", "msg_1"]);
    assert_eq!(snap.info, info);

    // From a message on, the mirror becomes what the server has: changed, added, dropped.
    let second = [message("msg_0a", "one, edited"), message("msg_2", "four")];
    assert!(
        mirror::write_turn(
            pool,
            session,
            fence_a,
            turn("ses_one", &info, Some("msg_0a"), &second)
        )
        .await
        .unwrap()
    );
    let snap = mirror::snapshot(pool, session, "ses_one")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids(&snap), ["msg_0Z", "msg_0a", "msg_2"]);
    assert_eq!(snap.messages[1]["parts"][0]["text"], "one, edited");

    // Another worker takes the session over: the old owner writes nothing any more.
    leases::release(pool, session, fence_a).await.unwrap();
    let fence_b = leases::claim(pool, session, b, ttl).await.unwrap().unwrap();
    assert!(
        !mirror::write_turn(pool, session, fence_a, turn("ses_one", &info, None, &first))
            .await
            .unwrap()
    );
    let snap = mirror::snapshot(pool, session, "ses_one")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids(&snap), ["msg_0Z", "msg_0a", "msg_2"]);

    // A new OpenCode conversation replaces the mirror of the old one whole.
    let other = [message("msg_9", "new")];
    assert!(
        mirror::write_turn(
            pool,
            session,
            fence_b,
            turn("ses_two", &info, Some("msg_9"), &other)
        )
        .await
        .unwrap()
    );
    assert!(
        mirror::snapshot(pool, session, "ses_one")
            .await
            .unwrap()
            .is_none()
    );
    let snap = mirror::snapshot(pool, session, "ses_two")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids(&snap), ["msg_9"]);
}
