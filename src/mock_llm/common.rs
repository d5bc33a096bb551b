//! Plumbing shared by the mock LLM servers: the request log, a server task owned by a handle,
//! delayed streaming bodies, and the `[[bash:CMD]]` prompt marker.

use std::convert::Infallible;
use std::fs::File;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Request bodies that are not JSON are logged as text cut to this many characters.
const LOGGED_TEXT_CHARS: usize = 2000;

/// How long `shutdown` waits for open connections before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What a mock received, in memory for `/_mock/requests` and optionally mirrored to a JSONL
/// file (which `reset` leaves alone, so a file survives a test's resets).
pub(crate) struct RequestLog {
    entries: Mutex<Vec<Value>>,
    file: Option<Mutex<File>>,
}

impl RequestLog {
    /// An empty log; fails only when `file` cannot be opened for appending.
    pub(crate) fn open(file: Option<&Path>) -> io::Result<Self> {
        let file = match file {
            Some(path) => Some(Mutex::new(
                File::options().create(true).append(true).open(path)?,
            )),
            None => None,
        };
        Ok(Self {
            entries: Mutex::new(Vec::new()),
            file,
        })
    }

    pub(crate) fn entries(&self) -> Vec<Value> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Appends `{t, method, path, headers, body}`, keeping only the `logged_headers`.
    pub(crate) fn record(
        &self,
        logged_headers: &[&str],
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &Bytes,
    ) {
        let entry = log_entry(logged_headers, method, uri, headers, body);
        if let Some(file) = &self.file {
            // A small blocking append: fine for a test double, and it keeps the file in
            // request order.
            let mut file = file.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(err) = writeln!(file, "{entry}") {
                tracing::warn!(error = %err, "mock could not append to its request log file");
            }
        }
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(entry);
    }
}

fn log_entry(
    logged_headers: &[&str],
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Value {
    // A string, not float seconds: it survives a JSON round trip exactly.
    let t = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let logged: serde_json::Map<String, Value> = logged_headers
        .iter()
        .filter_map(|name| {
            let value = headers.get(*name)?;
            Some((
                (*name).to_owned(),
                Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned()),
            ))
        })
        .collect();
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body).unwrap_or_else(|_| {
            Value::String(
                String::from_utf8_lossy(body)
                    .chars()
                    .take(LOGGED_TEXT_CHARS)
                    .collect(),
            )
        })
    };
    json!({"t": t, "method": method.as_str(), "path": path, "headers": logged, "body": body})
}

/// An axum server running in a task this handle owns. Dropping the handle stops it;
/// [`ServerTask::shutdown`] also waits for it.
pub(crate) struct ServerTask {
    addr: SocketAddr,
    token: CancellationToken,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl ServerTask {
    /// Serves `router` on `listener` until `token` is cancelled. The token is the caller's so
    /// that its streams can end on shutdown too.
    pub(crate) fn spawn(
        listener: TcpListener,
        router: Router,
        token: CancellationToken,
    ) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let signal = token.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(signal)
                .await
        });
        Ok(Self {
            addr,
            token,
            task: Some(task),
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` for a loopback or unspecified IPv4 bind, else the address.
    pub(crate) fn base_url(&self) -> String {
        if self.addr.ip().is_unspecified() || self.addr.ip().is_loopback() && self.addr.is_ipv4() {
            format!("http://127.0.0.1:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// Stops accepting, ends open streams and waits (bounded) for the server task.
    pub(crate) async fn shutdown(mut self) -> io::Result<()> {
        self.token.cancel();
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(SHUTDOWN_GRACE, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(io::Error::other(join)),
            Err(_elapsed) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "mock server did not stop in time",
            )),
        }
    }
}

impl Drop for ServerTask {
    fn drop(&mut self) {
        // Cancelling ends the streams and makes every connection close gracefully; the
        // abort covers the accept loop, which nobody will join any more.
        self.token.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A running mock (either API). Dropping it stops the server; [`MockServer::shutdown`] also
/// waits for it.
pub struct MockServer {
    log: Arc<RequestLog>,
    server: ServerTask,
}

impl std::fmt::Debug for MockServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockServer")
            .field("addr", &self.server.addr())
            .finish_non_exhaustive()
    }
}

impl MockServer {
    pub(crate) fn new(log: Arc<RequestLog>, server: ServerTask) -> Self {
        Self { log, server }
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// The server's root, e.g. `http://127.0.0.1:41234`.
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// Every logged request so far, oldest first (the body of `GET /_mock/requests`).
    pub fn requests(&self) -> Vec<Value> {
        self.log.entries()
    }

    /// Clears the in-memory request log (the JSONL mirror is kept).
    pub fn reset(&self) {
        self.log.clear();
    }

    /// Stops accepting, ends open streams and waits (bounded) for the server task.
    pub async fn shutdown(self) -> io::Result<()> {
        self.server.shutdown().await
    }

    pub(crate) fn into_server(self) -> ServerTask {
        self.server
    }
}

/// For the `mock-*` subcommands: prints `<banner> LISTENING <port>` on stdout, serves until
/// Ctrl-C, then shuts the server down.
pub(crate) async fn announce_and_serve(banner: &str, server: ServerTask) -> io::Result<()> {
    {
        let mut stdout = io::stdout().lock();
        writeln!(stdout, "{banner} LISTENING {}", server.addr().port())?;
        stdout.flush()?;
    }
    tokio::signal::ctrl_c().await?;
    server.shutdown().await
}

/// A `text/event-stream` response sending each chunk after its pause. A client that hangs up
/// drops the body, which drops this stream mid-sleep: the stream simply stops. Cancelling
/// `token` (shutdown) ends it too.
pub(crate) fn delayed_event_stream(
    chunks: Vec<(Duration, Bytes)>,
    token: &CancellationToken,
) -> Response {
    let stream = futures::stream::iter(chunks)
        .then(|(delay, chunk)| async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok::<_, Infallible>(chunk)
        })
        .take_until(token.clone().cancelled_owned());
    (
        [
            (CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// 24 random hex digits, for response, message and tool-call ids.
pub(crate) fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 12]>())
}

/// The text after each occurrence of `prefix` in `prompt`.
pub(crate) fn after_each<'a>(
    prompt: &'a str,
    prefix: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    prompt
        .match_indices(prefix)
        .filter_map(move |(at, _)| prompt.get(at + prefix.len()..))
}

/// `[[bash:CMD]]`. Nested `[[ … ]]` pairs stay in CMD, so `[[bash:[[ -f x ]] && ls]]` works.
pub(crate) fn bash_marker(prompt: &str) -> Option<String> {
    after_each(prompt, "[[bash:").find_map(|rest| {
        let mut depth = 0usize;
        let mut i = 0;
        while let Some(tail) = rest.get(i..) {
            if tail.starts_with("[[") {
                depth += 1;
                i += 2;
            } else if tail.starts_with("]]") {
                if depth == 0 {
                    let command = rest.get(..i)?.trim();
                    return (!command.is_empty()).then(|| command.to_owned());
                }
                depth -= 1;
                i += 2;
            } else {
                i += tail.chars().next()?.len_utf8();
            }
        }
        None
    })
}
