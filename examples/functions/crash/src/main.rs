//! `fn-crash`: on a call, reads the request, writes `crashing` to stderr and exits with status 3
//! without answering: an instance that dies mid-call, for testing how the runner copes.

use std::process::ExitCode;

use fn_fdk::{Body, Context};

fn main() -> ExitCode {
    fn_fdk::run(|_ctx: Context, body: Body| async move {
        body.bytes().await?;
        eprintln!("crashing");
        std::process::exit(3)
    })
}
