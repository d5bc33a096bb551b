//! The HTTP API: the router with its middleware, the OpenAPI document built from the same
//! routes, and the JSON fallbacks for unknown routes and methods.

pub mod admin;
pub mod auth;
pub mod docs;
pub mod error;
pub mod events;
pub mod extract;
pub mod fleet;
pub mod health;
pub mod opencode;
pub mod policy;
pub mod sessions;
pub mod turns;

use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use crate::app::AppState;
use crate::config::HttpSettings;
use error::ApiError;

/// OpenAPI tags: one per area, as SDK generators turn them into classes.
pub mod tags {
    pub const HEALTH: &str = "health";
    pub const SESSIONS: &str = "sessions";
    pub const TURNS: &str = "turns";
    pub const EVENTS: &str = "events";
    pub const ADMIN: &str = "admin";
}

/// The routes and the OpenAPI document they describe.
fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let v1 = OpenApiRouter::new()
        .routes(routes!(sessions::create_session, sessions::list_sessions))
        .routes(routes!(sessions::get_session, sessions::delete_session))
        .routes(routes!(turns::create_turn, turns::list_turns))
        .routes(routes!(turns::get_turn))
        .routes(routes!(turns::interrupt_session))
        .routes(routes!(events::stream_events))
        .routes(routes!(admin::get_whoami))
        .nest(
            "/admin",
            OpenApiRouter::new()
                .routes(routes!(admin::list_tenants, admin::create_tenant))
                .routes(routes!(admin::list_keys, admin::create_key))
                .routes(routes!(admin::revoke_key))
                .routes(routes!(fleet::list_workers))
                .routes(routes!(fleet::drain_worker)),
        );
    OpenApiRouter::with_openapi(docs::ApiDoc::openapi())
        .routes(routes!(health::get_liveness))
        .routes(routes!(health::get_readiness))
        .nest("/v1", v1)
        .split_for_parts()
}

/// The OpenAPI document, as `hotplex openapi` prints it and `/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().1
}

/// The spec as checked in under `openapi/openapi.json`.
pub fn openapi_json() -> String {
    let mut text = openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    text.push('\n');
    text
}

/// The whole application: routes, docs, fallbacks and middleware.
pub fn router(state: AppState) -> Router {
    let (routes, spec) = routes();
    let http = state.settings.http.clone();
    let router = routes
        .merge(opencode::routes())
        .merge(SwaggerUi::new("/docs").url("/openapi.json", spec))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(http.body_limit))
        .with_state(state);
    with_middleware(router, &http)
}

fn with_middleware(router: Router, http: &HttpSettings) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    let trace = TraceLayer::new_for_http()
        .make_span_with(|req: &Request| {
            let route = req
                .extensions()
                .get::<axum::extract::MatchedPath>()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "(unmatched)".into());
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            tracing::info_span!("request", method = %req.method(), route = %route, request_id = %id)
        })
        .on_request(())
        .on_response(LogResponse)
        .on_failure(());
    router.layer(
        ServiceBuilder::new()
            .layer(SetSensitiveRequestHeadersLayer::new([
                header::AUTHORIZATION,
                HeaderName::from_static("x-api-key"),
            ]))
            .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
            .layer(trace)
            .layer(PropagateRequestIdLayer::new(request_id))
            .layer(cors(http))
            // Compression skips `text/event-stream` by its default predicate.
            .layer(CompressionLayer::new())
            .layer(axum::middleware::from_fn(error::normalize_errors))
            .layer(CatchPanicLayer::custom(error::panic_response))
            // Bounds the time to response headers only, so streams are unaffected.
            .layer(TimeoutLayer::with_status_code(
                StatusCode::SERVICE_UNAVAILABLE,
                http.request_timeout,
            )),
    )
}

/// Logs each response once, with status and duration, inside the request span.
#[derive(Debug, Clone, Copy)]
struct LogResponse;

impl<B> tower_http::trace::OnResponse<B> for LogResponse {
    fn on_response(self, res: &axum::http::Response<B>, latency: Duration, _span: &tracing::Span) {
        tracing::info!(
            status = res.status().as_u16(),
            duration_ms = latency.as_millis() as u64,
            "response"
        );
    }
}

fn cors(http: &HttpSettings) -> CorsLayer {
    let origins = &http.cors_allowed_origins;
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        // Checked at config load; an invalid entry would have stopped startup.
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("x-api-key"),
            HeaderName::from_static("last-event-id"),
            HeaderName::from_static("idempotency-key"),
        ])
        .expose_headers([HeaderName::from_static("x-request-id")])
        .max_age(Duration::from_secs(600))
}

/// Under `/v1` an unauthenticated caller learns nothing, not even which routes exist.
async fn guard_v1(
    state: &AppState,
    uri: &Uri,
    headers: &axum::http::HeaderMap,
) -> Result<(), ApiError> {
    if uri.path() == "/v1" || uri.path().starts_with("/v1/") {
        auth::authenticate(state, headers).await?;
    }
    Ok(())
}

async fn not_found(
    State(state): State<AppState>,
    uri: Uri,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Err(e) = guard_v1(&state, &uri, &headers).await {
        return e.into_response();
    }
    let message = format!("no route for {}", uri.path());
    if uri.path() == "/v1" || uri.path().starts_with("/v1/") {
        return ApiError::not_found(message).into_response();
    }
    // Outside `/v1` the caller may be an OpenCode client: its error shape, and ours.
    let body = opencode::error_body(StatusCode::NOT_FOUND, "not_found", &message);
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

async fn method_not_allowed(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Err(e) = guard_v1(&state, &uri, &headers).await {
        return e.into_response();
    }
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
    .into_response()
}
