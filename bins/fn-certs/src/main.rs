//! fn-certs: writes `ca.pem`, `node.pem` and `node-key.pem` for development and demos, and
//! rotates them.
//!
//! ```text
//! fn-certs --out deploy/certs --san npm --san lb-agent     # a new CA and node certificate
//! fn-certs --out deploy/certs --rotate                     # a new node certificate, same CA
//!                                                          # (and names, unless --san)
//! fn-certs --out deploy/certs --ca-rollover begin          # then switch, then finish
//! ```
//! The node certificate is valid for server and client authentication, for `localhost`,
//! `127.0.0.1`, `::1` and every `--san`. The CA's key stays in `issuer-key.pem` (owner-only),
//! for rotation, in `--issuer-dir`: a directory no daemon mounts, since whoever reads that key
//! can pose as any node (it defaults to `--out`, for a single machine's demo). Daemons pick up replaced files without a restart (`FN_TLS_RELOAD_INTERVAL`,
//! or SIGHUP). Production deployments bring their own PKI.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use fn_tls::dev::{Dirs, RolloverStep, files};

/// Generate a development CA and node certificate for the dataplane's mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "fn-certs", version, about)]
struct Cli {
    /// Directory to write ca.pem, node.pem and node-key.pem into (created if missing).
    #[arg(long, env = "FN_CERTS_DIR", default_value = "deploy/certs")]
    out: PathBuf,
    /// Directory for the CA's certificate and key, issuer.pem and issuer-key.pem (created if
    /// missing; default: --out). Give the daemons --out and not this one: its key makes
    /// certificates every node trusts. CA files found in --out are moved here.
    #[arg(long, env = "FN_CERTS_ISSUER_DIR")]
    issuer_dir: Option<PathBuf>,
    /// Extra DNS name or IP address for the node certificate (repeatable, or comma-separated;
    /// blanks around a name are ignored).
    #[arg(long = "san", env = "FN_CERTS_SANS", value_delimiter = ',',
          value_parser = fn_tls::dev::parse_san)]
    sans: Vec<String>,
    /// Keep existing files instead of replacing them (ignored by --rotate and --ca-rollover).
    #[arg(long, env = "FN_CERTS_KEEP", default_value_t = false,
          value_parser = clap::builder::BoolishValueParser::new())]
    keep: bool,
    /// Replace an existing CA (and so cut off every daemon that trusts only the old one).
    /// Without it, an existing CA is never replaced: use --rotate, --ca-rollover or --keep.
    #[arg(long, env = "FN_CERTS_FORCE", default_value_t = false,
          value_parser = clap::builder::BoolishValueParser::new())]
    force: bool,
    /// Replace the node certificate and key with new ones from the same CA (for the --san
    /// names given, or else the names of the certificate replaced).
    #[arg(long, env = "FN_CERTS_ROTATE", default_value_t = false, conflicts_with = "ca_rollover",
          value_parser = clap::builder::BoolishValueParser::new())]
    rotate: bool,
    /// One step of a CA rollover: `begin` (trust old and new CA), `switch` (node certificate
    /// from the new CA), `finish` (trust the new CA only). Let every daemon reload between
    /// steps.
    #[arg(long, env = "FN_CERTS_CA_ROLLOVER", value_enum)]
    ca_rollover: Option<Step>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Step {
    Begin,
    Switch,
    Finish,
}

/// The names of `wanted` the certificate at `node` lacks (all of them when it cannot be read).
fn missing_names(node: &std::path::Path, wanted: &[String]) -> Vec<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let names = std::fs::read(node)
        .ok()
        .and_then(|pem| CertificateDer::pem_slice_iter(&pem).next()?.ok())
        .and_then(|der| fn_tls::expiry::Validity::of(&der).ok())
        .map(|v| v.names)
        .unwrap_or_default();
    wanted
        .iter()
        .filter(|name| !names.iter().any(|n| fn_tls::dev::same_name(n, name)))
        .cloned()
        .collect()
}

/// Before a new CA is made: `Ok(Some(what was done))` when `--keep` kept the files there,
/// `Err(why not, and what to do)` when they must not be replaced, `Ok(None)` to make it. An
/// operator's own `ca.pem` and node files count as much as a CA of ours: replacing them cuts
/// off every daemon that trusts that CA.
fn keep_or_refuse(cli: &Cli, dirs: Dirs<'_>) -> Result<Option<String>, String> {
    let node_files = [files::BUNDLE, files::NODE, files::NODE_KEY];
    let (present, absent): (Vec<&str>, Vec<&str>) = node_files
        .iter()
        .partition(|f| dirs.nodes.join(f).is_file());
    let issuer_key = dirs.issuer_key();
    let issuer_cert = dirs.issuer.join(files::ISSUER);
    if cli.keep && present.is_empty() && issuer_key.exists() && issuer_cert.is_file() {
        // The node files are gone (their volume removed) but the CA is here: new node
        // files from it, so every daemon that trusts it keeps doing so.
        std::fs::copy(&issuer_cert, dirs.nodes.join(files::BUNDLE))
            .map_err(|e| format!("{}: cannot copy the CA: {e}", issuer_cert.display()))?;
        let sans: Vec<&str> = cli.sans.iter().map(String::as_str).collect();
        fn_tls::dev::renew_node_in(dirs, &sans).map_err(|e| e.to_string())?;
        return Ok(Some(format!(
            "wrote ca.pem, node.pem and node-key.pem in {} from the CA in {}",
            dirs.nodes.display(),
            dirs.issuer.display()
        )));
    }
    if cli.keep && absent.is_empty() {
        // Kept only if they serve: peers refuse a certificate expired, mismatched or from
        // another CA, and one a year old (all of them are) stops a stack that keeps it.
        let renewal = fn_tls::dev::kept_needs_renewal(dirs.nodes).map_err(|e| e.to_string())?;
        if let Some(fn_tls::dev::Renewal::Soon(why)) = &renewal
            && !issuer_key.exists()
        {
            // Still accepted: an operator's own set (renewed by their PKI) is theirs to renew.
            eprintln!(
                "fn-certs: warning: {why}; no CA key here ({}) to renew it: renew it before then",
                issuer_key.display()
            );
            return Ok(Some(format!(
                "keeping the certificates in {}",
                dirs.nodes.display()
            )));
        }
        if let Some(why) = renewal {
            if !issuer_key.exists() {
                return Err(format!(
                    "--keep: {why}. The CA's key to renew it, {}, is not there: put it back \
                     (--issuer-dir names its directory) and run again, or use --force for a new \
                     CA and node certificate (every daemon must then get the new ca.pem)",
                    issuer_key.display()
                ));
            }
            let sans: Vec<&str> = cli.sans.iter().map(String::as_str).collect();
            fn_tls::dev::renew_node_in(dirs, &sans).map_err(|e| e.to_string())?;
            let dir = dirs.nodes.display();
            return Ok(Some(format!(
                "renewed {dir}/node.pem and {dir}/node-key.pem from the same CA: {why}"
            )));
        }
        // A certificate without a name asked for would be refused by every peer that dials
        // the node by it.
        let missing = missing_names(&dirs.nodes.join(files::NODE), &cli.sans);
        if !missing.is_empty() {
            return Err(format!(
                "{}/node.pem lacks {}: peers dialling by it would refuse it. Run \
                 `fn-certs --out {} --rotate --san {}` for a new node certificate from the same \
                 CA, or remove the directory",
                dirs.nodes.display(),
                missing.join(", "),
                dirs.nodes.display(),
                cli.sans.join(" --san ")
            ));
        }
        return Ok(Some(format!(
            "keeping the certificates in {}",
            dirs.nodes.display()
        )));
    }
    let mut there: Vec<String> = present
        .iter()
        .map(|f| dirs.nodes.join(f).display().to_string())
        .collect();
    if issuer_key.exists() {
        there.push(issuer_key.display().to_string());
    }
    if cli.force || there.is_empty() {
        return Ok(None);
    }
    if cli.keep {
        let rotate = if present.contains(&files::BUNDLE) && issuer_key.exists() {
            "run --rotate for a new node certificate and key from the same CA, "
        } else {
            ""
        };
        return Err(format!(
            "--keep: {} missing in {}, so there is no whole set to keep ({} there). Put \
             {} back, {rotate}or use --force for a new CA and node certificate (it cuts off \
             every daemon that trusts the CA there)",
            absent.join(", "),
            dirs.nodes.display(),
            there.join(", "),
            if absent.len() == 1 { "it" } else { "them" },
        ));
    }
    Err(format!(
        "{} already there: a new CA would replace them and cut off every daemon that trusts \
         the one there. Use --rotate for a new node certificate, --ca-rollover to change the CA \
         without an outage, --keep to keep the files, or --force to replace them all the same",
        there.join(", ")
    ))
}

fn main() -> ExitCode {
    let cli: Cli = fn_lifecycle::config::parse_or_exit();
    let dirs = Dirs {
        nodes: &cli.out,
        issuer: cli.issuer_dir.as_deref().unwrap_or(&cli.out),
    };
    match fn_tls::dev::move_issuer_out_of_nodes(dirs) {
        Ok(moved) if !moved.is_empty() => println!(
            "moved {} from {} to {}: no daemon needs them",
            moved.join(", "),
            dirs.nodes.display(),
            dirs.issuer.display()
        ),
        Ok(_) => {}
        Err(e) => {
            eprintln!("error: moving the CA's files to --issuer-dir: {e}");
            return ExitCode::FAILURE;
        }
    }
    if !cli.rotate && cli.ca_rollover.is_none() {
        match keep_or_refuse(&cli, dirs) {
            Ok(None) => {}
            Ok(Some(said)) => {
                println!("{said}");
                return ExitCode::SUCCESS;
            }
            Err(said) => {
                eprintln!("error: {said}");
                return ExitCode::FAILURE;
            }
        }
    }
    let sans: Vec<&str> = cli.sans.iter().map(String::as_str).collect();
    let dir = cli.out.display();
    let done = if cli.rotate {
        fn_tls::dev::rotate_node_in(dirs, &sans)
            .map(|()| format!("wrote a new {dir}/node.pem and {dir}/node-key.pem from the same CA"))
    } else if let Some(step) = cli.ca_rollover {
        let (step, said) = match step {
            Step::Begin => (
                RolloverStep::Begin,
                "made a new CA; {dir}/ca.pem now trusts the old and the new CA. When every daemon has reloaded, run --ca-rollover switch",
            ),
            Step::Switch => (
                RolloverStep::Switch,
                "wrote a node certificate from the new CA. When every daemon has reloaded, run --ca-rollover finish",
            ),
            Step::Finish => (
                RolloverStep::Finish,
                "{dir}/ca.pem now trusts the new CA only; the rollover is done",
            ),
        };
        fn_tls::dev::ca_rollover_in(dirs, step, &sans)
            .map(|()| said.replace("{dir}", &dir.to_string()))
    } else {
        fn_tls::dev::write_dev_pki_in(dirs, &sans).map(|()| {
            format!(
                "wrote {dir}/ca.pem, {dir}/node.pem, {dir}/node-key.pem (and the CA in {}/issuer*.pem)\n\
                 export FN_NODE_CERT_AUTHORITY={dir}/ca.pem FN_NODE_CERT={dir}/node.pem FN_NODE_CERT_KEY={dir}/node-key.pem",
                dirs.issuer.display()
            )
        })
    };
    match done {
        Ok(said) => {
            println!("{said}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
