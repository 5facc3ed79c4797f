//! `fn-sleep`: sleeps for the number of milliseconds in the request body (plain decimal), then
//! answers `slept <n>ms`. A body that is not such a number answers 400. Every answer carries
//! `X-Fn-Pid`.

use std::process::ExitCode;
use std::time::Duration;

use fn_fdk::http::StatusCode;
use fn_fdk::http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use fn_fdk::{Body, Context, Response};

fn main() -> ExitCode {
    fn_fdk::run(|_ctx: Context, body: Body| async move {
        let body = body.bytes().await?;
        let millis = std::str::from_utf8(&body)
            .ok()
            .and_then(|text| text.trim().parse().ok());
        let response = match millis {
            Some(millis) => {
                tokio::time::sleep(Duration::from_millis(millis)).await;
                Response::new(format!("slept {millis}ms"))
            }
            None => Response::new("the body must be a whole number of milliseconds\n")
                .with_status(StatusCode::BAD_REQUEST),
        };
        Ok(response
            .with_header(CONTENT_TYPE, HeaderValue::from_static("text/plain"))
            .with_header(
                HeaderName::from_static("x-fn-pid"),
                std::process::id().into(),
            ))
    })
}
