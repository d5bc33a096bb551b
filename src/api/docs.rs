//! The OpenAPI document's frame: info, tags, security schemes, and the shared error
//! responses every operation lists.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi};

use super::error::ErrorBody;
use super::tags::{ADMIN, EVENTS, HEALTH, SESSIONS, TURNS};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hotplex",
        description = "Terminal coding agents (Claude Code, OpenCode) as a service. Every error \
                       response has the body `{\"error\":{\"code\",\"message\"}}`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    modifiers(&SecurityAddon),
    tags(
        (name = HEALTH, description = "Liveness and readiness probes (no key needed)"),
        (name = SESSIONS, description = "Agent sessions of the caller's tenant"),
        (name = TURNS, description = "Prompts and their outcomes; one turn at a time per session"),
        (name = EVENTS, description = "Everything a session emits, streamed with replay"),
        (name = ADMIN, description = "Tenants and API keys (admin keys only)"),
    ),
    components(schemas(ErrorBody)),
)]
pub struct ApiDoc;

struct SecurityAddon;

impl Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearerAuth",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("API key or JWT")
                    .description(Some(
                        "`Authorization: Bearer <api key>`, or a JWT from the issuer set in \
                         `auth.jwt` (when configured)",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "apiKey",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-API-Key",
                "The API key",
            ))),
        );
    }
}

/// Errors any authenticated operation may answer.
#[derive(IntoResponses)]
#[allow(dead_code)] // Only a description for the spec.
pub enum AuthErrors {
    /// No key or token, or an invalid, expired or revoked one (with `WWW-Authenticate`).
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// A server-side failure (details are in the server log, not here).
    #[response(status = 500)]
    Internal(ErrorBody),
    /// The server is overloaded or timed out; retry.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// Errors of operations that take input.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum InputErrors {
    /// Malformed JSON, path or query.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// The body is larger than the server accepts.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// The body is not `application/json`.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// Well-formed JSON with a wrong field, type or value.
    #[response(status = 422)]
    Invalid(ErrorBody),
}

/// The object does not exist (or belongs to another tenant).
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum NotFoundError {
    /// Not found, or not yours.
    #[response(status = 404)]
    NotFound(ErrorBody),
}

/// Admin-only operations.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum AdminErrors {
    /// The caller is not an admin (key role, or the token's role claim).
    #[response(status = 403)]
    Forbidden(ErrorBody),
}

/// Errors of operations with path or query parameters.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum ParamErrors {
    /// A malformed path or query parameter.
    #[response(status = 400)]
    BadRequest(ErrorBody),
}
