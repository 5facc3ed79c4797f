//! `fn-echo`: streams the request body back as it arrives, so a client reads its first bytes
//! before it has finished sending.
//!
//! The answer carries the request's `Content-Type` (if any), every request header whose name
//! starts with `X-Echo-` unchanged, and `X-Fn-Pid`.

use std::process::ExitCode;

use fn_fdk::http::header::{CONTENT_TYPE, HeaderName};
use fn_fdk::{Body, Context, Response};

fn main() -> ExitCode {
    fn_fdk::run(|ctx: Context, body: Body| async move {
        let mut response = Response::new(body).with_header(
            HeaderName::from_static("x-fn-pid"),
            std::process::id().into(),
        );
        for (name, value) in ctx.headers() {
            if name == CONTENT_TYPE || name.as_str().starts_with("x-echo-") {
                response.headers_mut().append(name.clone(), value.clone());
            }
        }
        Ok(response)
    })
}
