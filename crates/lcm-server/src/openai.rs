use crate::Server;
use axum::Router;

pub fn routes() -> Router<Server> {
    Router::new()
}
