//! `fn-hello`: answers `Hello, <name>!` for the name in the request body (`World` when empty).
//!
//! The greeting comes from the `GREETING` config variable when it is set and not empty. Every
//! answer carries `X-Fn-Pid`, so callers can tell instances apart.

use std::process::ExitCode;

use fn_fdk::http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use fn_fdk::{Body, Context, Response};

fn main() -> ExitCode {
    fn_fdk::run(|ctx: Context, body: Body| async move {
        let name = body.bytes().await?;
        let name = String::from_utf8_lossy(&name);
        let name = Some(name.trim())
            .filter(|name| !name.is_empty())
            .unwrap_or("World");
        let greeting = ctx
            .config("GREETING")
            .filter(|g| !g.is_empty())
            .unwrap_or("Hello");
        Ok(Response::new(format!("{greeting}, {name}!\n"))
            .with_header(CONTENT_TYPE, HeaderValue::from_static("text/plain"))
            .with_header(
                HeaderName::from_static("x-fn-pid"),
                std::process::id().into(),
            ))
    })
}
