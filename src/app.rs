//! Process-wide state shared by the HTTP handlers, and the shutdown handle every
//! subsystem hangs off.

use std::ops::Deref;
use std::sync::Arc;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::jwt::Verifier;
use crate::auth::{KEYS_CHANNEL, KeyCache};
use crate::config::Settings;
use crate::events::hub::EventHub;
use crate::events::listener::Handler;
use crate::waf::Waf;

/// How requests are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// API keys are required (the default).
    Keys,
    /// No key needed; callers act as the default tenant's admin. Loopback only.
    InsecureNoAuth,
}

/// Everything a handler may need. Holds no session state: any API node serves any request.
#[derive(Debug)]
pub struct App {
    pub pool: PgPool,
    pub settings: Arc<Settings>,
    pub auth: AuthMode,
    /// Wake-ups for event streams, fed by this process's LISTEN connection.
    pub hub: EventHub,
    /// Keys (and JWTs) this process has authenticated recently (emptied on any key change).
    pub keys: Arc<KeyCache>,
    /// JWT verification, when `auth.jwt` is configured.
    pub jwt: Option<Arc<Verifier>>,
    /// The WAF's compiled rules; `None` when they did not compile, and then every prompt is
    /// refused (fail closed).
    pub waf: Option<Arc<Waf>>,
    /// Cancelled at shutdown: long-lived responses (event streams, waits) end with it.
    pub shutdown: CancellationToken,
}

/// Cheap-to-clone handle to [`App`], the axum state.
#[derive(Debug, Clone)]
pub struct AppState(pub Arc<App>);

impl AppState {
    pub fn new(app: App) -> Self {
        Self(Arc::new(app))
    }

    /// The state of an API process: its event hub is fed by one LISTEN connection, a task
    /// tracked by `shutdown` and stopped with it.
    pub fn start(
        pool: PgPool,
        settings: Arc<Settings>,
        auth: AuthMode,
        shutdown: &Shutdown,
    ) -> Self {
        let hub = EventHub::new();
        let keys = Arc::new(KeyCache::default());
        shutdown.tracker.spawn(crate::events::listener::run(
            pool.clone(),
            vec![crate::events::EVENTS_CHANNEL, KEYS_CHANNEL],
            Listening {
                hub: hub.clone(),
                keys: keys.clone(),
            },
            shutdown.token.child_token(),
        ));
        // Loading the settings has checked the keys already; failing here (a key file
        // removed since) leaves tokens refused rather than the process down.
        let jwt = settings
            .auth
            .jwt
            .as_ref()
            .and_then(|jwt| match Verifier::new(jwt) {
                Ok(verifier) => Some(Arc::new(verifier)),
                Err(e) => {
                    tracing::error!(error = %e, "JWTs cannot be verified; every token is refused");
                    None
                }
            });
        // Loading the settings has compiled the rules already; only settings built by hand
        // can fail here.
        let waf = match Waf::new(&settings.waf) {
            Ok(waf) => Some(Arc::new(waf)),
            Err(e) => {
                tracing::error!(error = %e, "the WAF rules do not compile; every prompt is refused");
                None
            }
        };
        Self::new(App {
            pool,
            settings,
            auth,
            hub,
            keys,
            jwt,
            waf,
            shutdown: shutdown.token.clone(),
        })
    }
}

impl Deref for AppState {
    type Target = App;
    fn deref(&self) -> &App {
        &self.0
    }
}

/// One root cancellation token and the tracker of every task spawned under it.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    pub token: CancellationToken,
    pub tracker: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }
}

/// What an API process's LISTEN connection feeds: event streams and the key cache.
struct Listening {
    hub: EventHub,
    keys: Arc<KeyCache>,
}

impl Handler for Listening {
    fn notify(&self, channel: &str, payload: &str) {
        if channel == KEYS_CHANNEL {
            self.keys.clear();
        } else {
            self.hub.notify(channel, payload);
        }
    }

    fn resync(&self) {
        self.keys.clear();
        self.hub.resync();
    }
}
