//! The OpenCode-compatible API: the routes of `opencode serve` (1.18.33) at the root paths
//! OpenCode clients use — the SDK, `opencode run --attach`, the TUI — served from the same
//! sessions, turns and events as `/v1` (see docs/opencode-compat.md). Errors are OpenCode's
//! `{name, data}` with our `{error}` envelope beside it, so either kind of client reads them.

mod events;
mod meta;
mod sessions;

use axum::Router;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::error::ApiError;
use crate::app::AppState;
use crate::auth::Principal;

/// The routes (merged into the main router at the root).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/global/health", get(meta::health))
        .route("/event", get(events::directory_events))
        .route("/global/event", get(events::global_events))
        .route("/config", get(meta::config))
        .route("/config/providers", get(meta::config_providers))
        .route("/provider", get(meta::provider))
        .route("/provider/auth", get(meta::empty_object))
        .route("/agent", get(meta::agents))
        .route("/path", get(meta::path))
        .route("/project", get(meta::projects))
        .route("/project/current", get(meta::current_project))
        .route("/vcs", get(meta::vcs))
        .route("/command", get(meta::empty_list))
        .route("/lsp", get(meta::empty_list))
        .route("/formatter", get(meta::empty_list))
        .route("/mcp", get(meta::empty_object))
        .route("/permission", get(meta::empty_list))
        .route("/question", get(meta::empty_list))
        .route("/file/status", get(meta::empty_list))
        .route("/session", get(sessions::list).post(sessions::create))
        .route("/session/status", get(sessions::status))
        .route(
            "/session/{id}",
            get(sessions::get_one)
                .patch(sessions::update)
                .delete(sessions::delete),
        )
        .route("/session/{id}/children", get(sessions::empty_list))
        .route("/session/{id}/todo", get(sessions::empty_list))
        .route("/session/{id}/diff", get(sessions::empty_list))
        .route(
            "/session/{id}/message",
            get(sessions::messages).post(sessions::prompt),
        )
        .route("/session/{id}/message/{message_id}", get(sessions::message))
        .route("/session/{id}/prompt_async", post(sessions::prompt_async))
        .route("/session/{id}/abort", post(sessions::abort))
}

/// An error as OpenCode clients expect it: `{"name","data":{"message"}}`, plus our envelope.
#[derive(Debug)]
pub struct OcError(pub ApiError);

impl From<ApiError> for OcError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<crate::store::Error> for OcError {
    fn from(e: crate::store::Error) -> Self {
        Self(e.into())
    }
}

impl OcError {
    fn bad_request(message: impl Into<String>) -> Self {
        Self(ApiError::bad_request("invalid_request", message))
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self(ApiError::not_found(message))
    }
}

/// OpenCode's error name for a status.
fn error_name(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => "BadRequest",
        StatusCode::UNAUTHORIZED => "Unauthorized",
        StatusCode::FORBIDDEN => "Forbidden",
        StatusCode::NOT_FOUND => "NotFoundError",
        StatusCode::CONFLICT => "SessionBusyError",
        _ => "UnknownError",
    }
}

/// The body of an error for OpenCode clients, from our envelope's parts.
pub fn error_body(status: StatusCode, code: &str, message: &str) -> serde_json::Value {
    json!({
        "name": error_name(status),
        "data": {"message": message},
        "error": {"code": code, "message": message},
    })
}

impl IntoResponse for OcError {
    fn into_response(self) -> Response {
        let ApiError {
            status,
            code,
            ref message,
            ..
        } = self.0;
        let body = error_body(status, code, message);
        // Keep the cause (logged by the error middleware) by starting from our response.
        let mut response = self.0.into_response();
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        *response.body_mut() = axum::body::Body::from(bytes);
        response.headers_mut().remove(header::CONTENT_LENGTH);
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"hotplex\""),
            );
        }
        response
    }
}

/// The authenticated caller, with OpenCode-shaped rejections.
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = OcError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, OcError> {
        Ok(Self(Principal::from_request_parts(parts, state).await?))
    }
}

/// The caller's directory: `?directory=`, else the URL-encoded `x-opencode-directory`
/// header, else none (the server's default).
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub directory: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Scope {
    type Rejection = OcError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, OcError> {
        let from_query = parts.uri.query().and_then(|q| {
            form_urlencoded_pairs(q)
                .find(|(k, _)| k == "directory")
                .map(|(_, v)| v)
        });
        let directory = match from_query {
            Some(d) => Some(d),
            None => match parts.headers.get("x-opencode-directory") {
                Some(v) => {
                    let raw = v
                        .to_str()
                        .map_err(|_| OcError::bad_request("x-opencode-directory must be text"))?;
                    let decoded = percent_encoding::percent_decode_str(raw)
                        .decode_utf8()
                        .map_err(|_| {
                            OcError::bad_request("x-opencode-directory must be URL-encoded UTF-8")
                        })?;
                    Some(decoded.into_owned())
                }
                None => None,
            },
        };
        let directory = directory.filter(|d| !d.is_empty());
        if let Some(d) = &directory
            && (!d.starts_with('/') || d.chars().any(char::is_control) || d.len() > 4096)
        {
            return Err(OcError::bad_request(
                "directory must be an absolute path of at most 4096 bytes",
            ));
        }
        Ok(Self { directory })
    }
}

/// `key=value` pairs of a query string, decoded (`+` is a space).
fn form_urlencoded_pairs(q: &str) -> impl Iterator<Item = (String, String)> + '_ {
    q.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |s: &str| {
            let s = s.replace('+', " ");
            percent_encoding::percent_decode_str(&s)
                .decode_utf8_lossy()
                .into_owned()
        };
        (dec(k), dec(v))
    })
}

/// A query parameter of the request (OpenCode routes take loose, optional parameters).
fn query_param(uri: &axum::http::Uri, name: &str) -> Option<String> {
    uri.query().and_then(|q| {
        form_urlencoded_pairs(q)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_directory_comes_from_the_query_or_the_encoded_header() {
        async fn scope(uri: &str, header: Option<&str>) -> Result<Scope, OcError> {
            let mut req = axum::http::Request::builder().uri(uri);
            if let Some(h) = header {
                req = req.header("x-opencode-directory", h);
            }
            let (mut parts, ()) = req.body(()).unwrap().into_parts();
            Scope::from_request_parts(&mut parts, &()).await
        }
        assert_eq!(scope("/event", None).await.unwrap().directory, None);
        assert_eq!(
            scope("/event?directory=%2Ftmp%2Fa%20b", None)
                .await
                .unwrap()
                .directory
                .as_deref(),
            Some("/tmp/a b")
        );
        assert_eq!(
            scope("/event", Some("%2Ftmp%2F%C3%A9"))
                .await
                .unwrap()
                .directory
                .as_deref(),
            Some("/tmp/é")
        );
        // The query wins over the header.
        assert_eq!(
            scope("/x?directory=/q", Some("%2Fh"))
                .await
                .unwrap()
                .directory
                .as_deref(),
            Some("/q")
        );
        assert_eq!(
            scope("/x?directory=rel", None).await.unwrap_err().0.status,
            400
        );
    }

    #[test]
    fn errors_carry_both_shapes() {
        let b = error_body(
            StatusCode::NOT_FOUND,
            "not_found",
            "Session not found: ses_x",
        );
        assert_eq!(b["name"], "NotFoundError");
        assert_eq!(b["data"]["message"], "Session not found: ses_x");
        assert_eq!(b["error"]["code"], "not_found");
    }
}
