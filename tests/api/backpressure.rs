//! Backpressure with real sockets: a client that stops reading its event stream while a
//! large backlog is written must not grow the server's memory (the stream stops pulling
//! rows from the table), and when it reads again it gets every event exactly once, in
//! order, from the table. The app serves in this process, so the process's resident memory
//! is the server's; the client reads over a raw socket with a small receive buffer, so it
//! decides exactly when bytes are taken off the wire.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use hotplex::domain::{SessionId, TurnId};
use hotplex::events::{EventBody, NewEvent, Usage};
use hotplex::sse::{Frame, Parser};
use hotplex::store;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::TestApp;

/// Events written while the client is stalled, and the text each carries: 35 MiB in all,
/// several times what the kernel's socket buffers can hold.
const EVENTS: usize = 6000;
const TEXT_BYTES: usize = 6 * 1024;
/// How much the process may grow while the backlog is written and then read: a third of
/// the backlog. A stream holds one page of rows (256) and hyper at most ~400 KiB; anything
/// that buffered the backlog would grow by all of it.
const GROWTH_BOUND: u64 = 12 << 20;

/// The text of backlog event `i`: a marker with its index, then padding.
fn text(i: usize) -> String {
    let mut t = format!("<{i:06}>");
    t.push_str(&"x".repeat(TEXT_BYTES));
    t
}

/// The index in the marker that starts `s` (`<000123>…`).
fn marker(s: &str) -> Option<usize> {
    s.strip_prefix('<')?.get(..6)?.parse().ok()
}

/// Writes the backlog straight into the table in batches, as a worker's writer does (each
/// batch is one statement and one notification). The deltas of `range` go to `turn`, or to
/// the session when `turn` is `None`; the turn, if any, then completes. Returns the last seq.
async fn write_events(
    app: &TestApp,
    session: SessionId,
    turn: Option<TurnId>,
    range: std::ops::Range<usize>,
) -> i64 {
    let new = |body| NewEvent {
        turn_id: turn,
        body,
    };
    let mut conn = app.db.pool.acquire().await.unwrap();
    let mut last = 0;
    let indexes: Vec<usize> = range.collect();
    for batch in indexes.chunks(100) {
        let mut events: Vec<NewEvent> = batch
            .iter()
            .map(|&i| new(EventBody::TextDelta { text: text(i) }))
            .collect();
        if turn.is_some() && batch.last() == indexes.last() {
            events.push(new(EventBody::TurnCompleted {
                result: String::new(),
                usage: Usage::default(),
            }));
        }
        last = store::events::append(&mut conn, session, None, &events)
            .await
            .unwrap();
    }
    last
}

/// This process's resident memory, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .expect("VmRSS in /proc/self/status");
    kb.trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// The highest resident memory seen while it runs (sampled every 5 ms on a thread of its
/// own, so it sees the peak whatever the runtime is doing).
struct PeakRss {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl PeakRss {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss()));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self { stop, peak, thread }
    }

    fn now(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.peak.load(Ordering::Relaxed).max(rss())
    }
}

/// The body of an HTTP/1.1 chunked response, decoded incrementally.
#[derive(Default)]
struct Chunked {
    buf: Vec<u8>,
    /// Payload bytes left in the current chunk.
    left: usize,
    /// The CRLF after a chunk's payload is still to come.
    crlf: bool,
}

impl Chunked {
    fn push(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.buf.extend_from_slice(bytes);
        let mut pos = 0;
        loop {
            let rest = &self.buf[pos..];
            if self.left > 0 {
                let n = self.left.min(rest.len());
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&rest[..n]);
                pos += n;
                self.left -= n;
                self.crlf = self.left == 0;
            } else if self.crlf {
                if rest.len() < 2 {
                    break;
                }
                assert_eq!(&rest[..2], b"\r\n", "chunk not followed by CRLF");
                pos += 2;
                self.crlf = false;
            } else {
                let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                    break;
                };
                let line = std::str::from_utf8(&rest[..eol]).unwrap();
                let size = line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size, 16).expect("chunk size");
                assert_ne!(size, 0, "the event stream ended");
                pos += eol + 2;
                self.left = size;
            }
        }
        self.buf.drain(..pos);
    }
}

/// A `text/event-stream` GET over a raw socket: the test reads it only when it wants to.
struct RawSse {
    sock: TcpStream,
    body: Chunked,
    parser: Parser,
    frames: std::collections::VecDeque<Frame>,
    /// Body bytes received so far.
    received: u64,
}

impl RawSse {
    async fn get(addr: SocketAddr, path: &str, authorization: &str) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        // A small receive window: a stalled reader stalls the server after a few KiB in
        // flight (plus the server's own send buffer).
        socket.set_recv_buffer_size(4096).unwrap();
        let mut sock = socket.connect(addr).await.unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: {authorization}\r\naccept: text/event-stream\r\n\r\n"
        );
        sock.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut byte))
                .await
                .expect("no response head in time")
                .unwrap();
            assert_eq!(n, 1, "connection closed before the response head");
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("content-type: text/event-stream"), "{head}");
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        Self {
            sock,
            body: Chunked::default(),
            parser: Parser::new(),
            frames: Default::default(),
            received: 0,
        }
    }

    /// The next event with data (comments skipped).
    async fn next(&mut self) -> Frame {
        let mut chunk = vec![0u8; 64 * 1024];
        let mut body = Vec::new();
        loop {
            if let Some(f) = self.frames.pop_front() {
                return f;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), self.sock.read(&mut chunk))
                .await
                .expect("no event in time")
                .unwrap();
            assert_ne!(n, 0, "the server closed the stream");
            body.clear();
            self.body.push(&chunk[..n], &mut body);
            self.received += body.len() as u64;
            self.frames.extend(self.parser.push(&body));
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Memory over one stall: from before the backlog is written until it has all been read.
struct Stall {
    base: u64,
    peak: PeakRss,
    /// Body bytes the client had received when it stopped reading.
    before: u64,
    /// Growth by the end of the stall.
    stalled: u64,
}

impl Stall {
    /// The client stops reading now.
    fn begin(client: &RawSse) -> Self {
        Self {
            base: rss(),
            peak: PeakRss::start(),
            before: client.received,
            stalled: 0,
        }
    }

    /// The backlog is written: the server gets time to fill the socket and stall on it.
    async fn hold(&mut self) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.stalled = self.peak.now().saturating_sub(self.base);
    }

    /// The client has read the backlog (`events` of them). On a measured round, checks that
    /// most of the backlog was still in the table when the client resumed (the stream had
    /// stopped pulling rather than holding it somewhere), and returns whether the growth
    /// stayed within the bound; the last attempt fails the test if it did not.
    fn end(self, client: &RawSse, events: usize, round: Round) -> bool {
        let grown = self.peak.finish().saturating_sub(self.base);
        let after = client.received - self.before;
        let backlog = (events * TEXT_BYTES) as u64;
        eprintln!(
            "{round:?}: backlog {:.1} MiB: grew {:.1} MiB stalled, {:.1} MiB at most; {:.1} MiB sent after the stall",
            mib(backlog),
            mib(self.stalled),
            mib(grown),
            mib(after)
        );
        let Round::Measured(attempt) = round else {
            return false;
        };
        assert!(after > backlog / 2, "{after} bytes after the stall");
        let within = self.stalled < GROWTH_BOUND && grown < GROWTH_BOUND;
        assert!(
            within || attempt < ATTEMPTS,
            "the server grew {:.1} MiB stalled, {:.1} MiB at most, for a backlog of {:.1} MiB",
            mib(self.stalled),
            mib(grown),
            mib(backlog)
        );
        within
    }
}

/// Measured rounds tried before the test fails: the other tests of this process allocate
/// too, now and then, while a backlog that is buffered grows the server every time.
const ATTEMPTS: usize = 3;

#[derive(Debug, Clone, Copy)]
enum Round {
    /// Pays the fixed costs (the pool's connection buffers, the allocator's high-water
    /// marks), so that a measured round shows what the backlog itself costs.
    WarmUp,
    /// Attempt 1, 2, …
    Measured(usize),
}

/// The warm-up, then measured rounds until one stays within the bound: `(round, events)`.
fn rounds() -> impl Iterator<Item = (Round, usize)> {
    std::iter::once((Round::WarmUp, EVENTS / 4))
        .chain((1..=ATTEMPTS).map(|a| (Round::Measured(a), EVENTS)))
}

/// The two tests measure one process: they take turns.
static MEASURING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn a_stalled_sse_client_costs_no_memory_and_resumes_from_the_table() {
    let _measuring = MEASURING.lock().await;
    let app = TestApp::spawn().await;
    let session: SessionId = app.new_session(&app.admin_key).await.parse().unwrap();
    let mut client = RawSse::get(
        app.addr,
        &format!("/v1/sessions/{session}/events"),
        &format!("Bearer {}", app.admin_key),
    )
    .await;
    let created = client.next().await;
    assert_eq!(created.id.as_deref(), Some("1"));
    assert_eq!(created.event.as_deref(), Some("session.created"));

    // Event `i` of the backlog has seq `2 + i`.
    let mut next = 0;
    for (round, events) in rounds() {
        // The client stops reading; the backlog is written.
        let mut stall = Stall::begin(&client);
        let last = write_events(&app, session, None, next..next + events).await;
        assert_eq!(last, 1 + (next + events) as i64);
        stall.hold().await;
        // The client reads again: everything, once, in order.
        for i in next..next + events {
            let f = client.next().await;
            let seq = 2 + i as i64;
            assert_eq!(f.id, Some(seq.to_string()), "event {i} of the backlog");
            assert_eq!(f.event.as_deref(), Some("text.delta"));
            let ev: Value = serde_json::from_str(&f.data).unwrap();
            assert_eq!(ev["seq"], seq);
            let text = ev["text"].as_str().unwrap();
            assert_eq!((marker(text), text.len()), (Some(i), 8 + TEXT_BYTES));
        }
        next += events;
        if stall.end(&client, events, round) {
            break;
        }
    }

    // And the stream is live again: a new event arrives by itself.
    let seq = write_events(&app, session, None, next..next + 1).await;
    assert_eq!(client.next().await.id, Some(seq.to_string()));
}

#[tokio::test]
async fn a_stalled_opencode_event_client_costs_no_memory_and_resumes_from_the_table() {
    let _measuring = MEASURING.lock().await;
    let app = TestApp::spawn().await;
    let session: SessionId = app.new_session(&app.admin_key).await.parse().unwrap();
    let creds =
        base64::engine::general_purpose::STANDARD.encode(format!("opencode:{}", app.admin_key));
    let mut client = RawSse::get(app.addr, "/event", &format!("Basic {creds}")).await;
    let connected: Value = serde_json::from_str(&client.next().await.data).unwrap();
    assert_eq!(connected["type"], "server.connected");

    // The backlog is spread over turns of 100 deltas (a live stream keeps a running turn's
    // text, not a finished one's); the turns stay queued, no worker runs.
    const PER_TURN: usize = 100;
    let mut next = 0;
    for (round, events) in rounds() {
        let mut turns = Vec::new();
        for _ in 0..events / PER_TURN {
            let t: Value = app
                .post(&format!("/v1/sessions/{session}/turns"), &app.admin_key)
                .json(&json!({"prompt": "p"}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            turns.push(t["id"].as_str().unwrap().parse::<TurnId>().unwrap());
        }
        let mut stall = Stall::begin(&client);
        for (k, turn) in turns.into_iter().enumerate() {
            let from = next + k * PER_TURN;
            write_events(&app, session, Some(turn), from..from + PER_TURN).await;
        }
        stall.hold().await;
        // Every delta, once, in order (a turn's whole text also comes once, at its end, in
        // `message.part.updated`; that is not a delta).
        let mut i = next;
        while i < next + events {
            let f = client.next().await;
            if !f.data.contains("\"message.part.delta\"") {
                continue;
            }
            let ev: Value = serde_json::from_str(&f.data).unwrap();
            let delta = ev["properties"]["delta"].as_str().unwrap();
            assert_eq!(
                (marker(delta), delta.len()),
                (Some(i), 8 + TEXT_BYTES),
                "delta {i}"
            );
            i += 1;
        }
        next += events;
        if stall.end(&client, events, round) {
            break;
        }
    }
}
