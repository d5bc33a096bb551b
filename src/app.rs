//! Process-wide state shared by the HTTP handlers, and the shutdown handle every
//! subsystem hangs off.

use std::ops::Deref;
use std::sync::Arc;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;

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
}

/// Cheap-to-clone handle to [`App`], the axum state.
#[derive(Debug, Clone)]
pub struct AppState(pub Arc<App>);

impl AppState {
    pub fn new(app: App) -> Self {
        Self(Arc::new(app))
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
