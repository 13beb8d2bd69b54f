//! Errors as each API's clients expect them: the native API's, AUTOMATIC1111's (FastAPI) and
//! OpenAI's `{"error": {...}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Which API a request came through, for the shape of its errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Native,
    A1111,
    OpenAi,
}

impl Shape {
    /// The API a path belongs to.
    pub fn of_path(path: &str) -> Self {
        if path.starts_with("/v1/") {
            Self::OpenAi
        } else if path.starts_with("/sdapi/") || path.starts_with("/controlnet/") {
            Self::A1111
        } else {
            Self::Native
        }
    }
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub shape: Shape,
    /// OpenAI's `param`: the field at fault.
    pub param: Option<String>,
    pub retry_after: Option<u64>,
    pub www_authenticate: bool,
}

impl ApiError {
    pub fn new(shape: Shape, status: StatusCode, message: impl Into<String>) -> Self {
        let message = one_line(&message.into());
        Self { status, message, shape, param: None, retry_after: None, www_authenticate: false }
    }

    pub fn bad(shape: Shape, message: impl Into<String>) -> Self {
        Self::new(shape, StatusCode::BAD_REQUEST, message)
    }

    pub fn param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    /// An engine error: its typed kind decides the status (400 / 413 / 404), anything else is an
    /// internal error (500).
    pub fn engine(shape: Shape, e: &anyhow::Error) -> Self {
        let status = lcm::Error::find(e)
            .and_then(|t| StatusCode::from_u16(t.http_status()).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self::new(shape, status, format!("{e:#}"))
    }

    pub fn from_engine_error(shape: Shape, e: &lcm::Error) -> Self {
        let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
        Self::new(shape, status, e.to_string())
    }
}

/// Messages are one line of at most a few hundred characters.
pub fn one_line(s: &str) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() > 400 {
        s.chars().take(400).collect::<String>() + "..."
    } else {
        s
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.status.as_u16();
        let body = match self.shape {
            Shape::Native => json!({"error": {"message": self.message, "status": code}}),
            // FastAPI's HTTPException body, plus the fields A1111's own API errors carry.
            Shape::A1111 => json!({
                "error": self.status.canonical_reason().unwrap_or("Error"),
                "detail": self.message,
                "body": "",
                "errors": self.message,
            }),
            Shape::OpenAi => {
                let kind = match code {
                    401 => "authentication_error",
                    404 => "not_found_error",
                    429 => "rate_limit_error",
                    500.. => "server_error",
                    _ => "invalid_request_error",
                };
                let err_code: Option<&str> = match code {
                    401 => Some("invalid_api_key"),
                    404 => Some("model_not_found"),
                    429 => Some("rate_limit_exceeded"),
                    _ => None,
                };
                json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": err_code}})
            }
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.www_authenticate {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"lcm\""));
        }
        resp
    }
}
