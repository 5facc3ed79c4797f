//! fn-certs: writes `ca.pem`, `node.pem` and `node-key.pem` for development and demos.
//!
//! ```text
//! fn-certs --out deploy/certs --san npm --san lb-agent
//! ```
//! The node certificate is valid for server and client authentication, for `localhost`,
//! `127.0.0.1`, `::1` and every `--san`. Production deployments bring their own PKI.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Generate a development CA and node certificate for the dataplane's mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "fn-certs", version, about)]
struct Cli {
    /// Directory to write ca.pem, node.pem and node-key.pem into (created if missing).
    #[arg(long, env = "FN_CERTS_DIR", default_value = "deploy/certs")]
    out: PathBuf,
    /// Extra DNS name or IP address for the node certificate (repeatable, or comma-separated).
    #[arg(long = "san", env = "FN_CERTS_SANS", value_delimiter = ',')]
    sans: Vec<String>,
    /// Keep existing files instead of replacing them.
    #[arg(long, env = "FN_CERTS_KEEP", default_value_t = false,
          value_parser = clap::builder::BoolishValueParser::new())]
    keep: bool,
}

fn main() -> ExitCode {
    let cli: Cli = fn_lifecycle::config::parse_or_exit();
    if cli.keep
        && ["ca.pem", "node.pem", "node-key.pem"]
            .iter()
            .all(|f| cli.out.join(f).is_file())
    {
        println!("keeping the certificates in {}", cli.out.display());
        return ExitCode::SUCCESS;
    }
    let sans: Vec<&str> = cli.sans.iter().map(String::as_str).collect();
    match fn_tls::dev::write_dev_pki(&cli.out, &sans) {
        Ok(()) => {
            println!(
                "wrote {dir}/ca.pem, {dir}/node.pem, {dir}/node-key.pem\n\
                 export FN_NODE_CERT_AUTHORITY={dir}/ca.pem FN_NODE_CERT={dir}/node.pem FN_NODE_CERT_KEY={dir}/node-key.pem",
                dir = cli.out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
