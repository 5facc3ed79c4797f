//! `deploy/stack-secrets.sh`, which `make stack-up` runs to turn the certificate files in
//! deploy/certs into the stack's swarm secrets, against a fake `docker` (a script first in
//! `PATH` that keeps each secret as a file and its `fn.sha256` label beside it), so that no
//! engine or swarm is needed:
//!
//! - a missing secret is created from its file, labelled with the file's SHA-256;
//! - a second run with the same files creates nothing and says nothing;
//! - a file renewed since its secret was made (what `fn-certs --keep` does within 30 days of
//!   a certificate's end) is warned of on stderr, naming the secret and the README section
//!   on rotating secrets, and the secret is kept (a secret cannot change);
//! - a secret without the label (made by hand, or by an older `make stack-up`) is said to
//!   be one the script cannot compare.
//!
//! `make test-swarm` checks the label and the warning against a real swarm.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, ensure};

/// A `docker` that answers the two commands the script uses, `secret inspect --format ...
/// NAME` (the label, empty when the secret has none; exit 1 when there is no such secret)
/// and `secret create [--label fn.sha256=SUM] NAME FILE`, from a directory of secrets.
const FAKE_DOCKER: &str = r#"#!/bin/sh
set -eu
store=$FAKE_DOCKER_STORE
[ "$1 $2" = "secret inspect" ] && {
  eval "name=\${$#}"
  [ -e "$store/$name" ] || { echo "Error: no such secret: $name" >&2; exit 1; }
  cat "$store/$name.label" 2>/dev/null || true
  echo
  exit 0
}
[ "$1 $2 $3" = "secret create --label" ] && {
  label=$4 name=$5 file=$6
  [ -e "$store/$name" ] && { echo "Error: secret $name exists" >&2; exit 1; }
  cp "$file" "$store/$name"
  printf '%s' "${label#fn.sha256=}" >"$store/$name.label"
  echo "id-$name"
  exit 0
}
[ "$1 $2" = "secret create" ] && [ $# -eq 4 ] && {
  [ -e "$store/$3" ] && { echo "Error: secret $3 exists" >&2; exit 1; }
  cp "$4" "$store/$3"
  echo "id-$3"
  exit 0
}
echo "fake docker: unexpected command: $*" >&2
exit 3
"#;

const PAIRS: [&str; 3] = [
    "fn-dataplane-ca.pem:ca.pem",
    "fn-dataplane-node.pem:node.pem",
    "fn-dataplane-node-key.pem:node-key.pem",
];

struct Fake {
    _dir: tempfile::TempDir,
    bin: PathBuf,
    store: PathBuf,
    certs: PathBuf,
}

impl Fake {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let bin = dir.path().join("bin");
        let store = dir.path().join("secrets");
        let certs = dir.path().join("certs");
        for d in [&bin, &store, &certs] {
            std::fs::create_dir(d)?;
        }
        let docker = bin.join("docker");
        std::fs::write(&docker, FAKE_DOCKER)?;
        std::fs::set_permissions(&docker, std::fs::Permissions::from_mode(0o755))?;
        for (file, text) in [
            ("ca.pem", "ca 1\n"),
            ("node.pem", "node 1\n"),
            ("node-key.pem", "key 1\n"),
        ] {
            std::fs::write(certs.join(file), text)?;
        }
        Ok(Self {
            _dir: dir,
            bin,
            store,
            certs,
        })
    }

    /// Runs the script over the test's certificates with the given pairs.
    fn run(&self, pairs: &[&str]) -> anyhow::Result<Output> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/stack-secrets.sh");
        let path = format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let output = Command::new("sh")
            .arg(&script)
            .arg(&self.certs)
            .args(pairs)
            .env("PATH", path)
            .env("FAKE_DOCKER_STORE", &self.store)
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        ensure!(
            output.status.success(),
            "{} failed: {}\n{}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(output)
    }

    fn label(&self, name: &str) -> anyhow::Result<String> {
        std::fs::read_to_string(self.store.join(format!("{name}.label")))
            .with_context(|| format!("the secret {name} has no fn.sha256 label"))
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn secrets_are_created_labelled_and_a_renewed_file_is_warned_of() -> anyhow::Result<()> {
    let fake = Fake::new()?;

    let first = fake.run(&PAIRS)?;
    let stdout = String::from_utf8_lossy(&first.stdout);
    for name in [
        "fn-dataplane-ca.pem",
        "fn-dataplane-node.pem",
        "fn-dataplane-node-key.pem",
    ] {
        ensure!(
            stdout.contains(&format!("created secret {name}")),
            "{name} not created: {stdout}"
        );
    }
    ensure!(
        first.stderr.is_empty(),
        "warned at creation: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    ensure!(
        fake.label("fn-dataplane-node.pem")? == sha256_hex(b"node 1\n"),
        "the secret is labelled with its file's sha256: {}",
        fake.label("fn-dataplane-node.pem")?
    );

    let again = fake.run(&PAIRS)?;
    ensure!(
        again.stdout.is_empty() && again.stderr.is_empty(),
        "a second run with the same files says something: {} {}",
        String::from_utf8_lossy(&again.stdout),
        String::from_utf8_lossy(&again.stderr)
    );

    // fn-certs --keep renewed the node certificate.
    std::fs::write(fake.certs.join("node.pem"), "node 2\n")?;
    let renewed = fake.run(&PAIRS)?;
    let stderr = String::from_utf8_lossy(&renewed.stderr);
    ensure!(
        stderr.contains("WARNING: the swarm secret fn-dataplane-node.pem is not")
            && stderr.contains("Rotating the certificates"),
        "no warning naming the secret and the README section: {stderr:?}"
    );
    ensure!(
        !stderr.contains("fn-dataplane-ca.pem") && !stderr.contains("fn-dataplane-node-key.pem"),
        "warned of a secret whose file did not change: {stderr}"
    );
    ensure!(
        std::fs::read_to_string(fake.store.join("fn-dataplane-node.pem"))? == "node 1\n",
        "the secret was replaced"
    );
    Ok(())
}

#[test]
fn a_secret_without_the_label_cannot_be_compared() -> anyhow::Result<()> {
    let fake = Fake::new()?;
    // Made by an older make stack-up: no label.
    std::fs::write(fake.store.join("fn-dataplane-ca.pem"), "ca 0\n")?;
    let output = fake.run(&PAIRS[..1])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        stderr.contains("WARNING: cannot tell whether the swarm secret fn-dataplane-ca.pem")
            && stderr.contains("Rotating the certificates"),
        "{stderr:?}"
    );
    ensure!(
        output.stdout.is_empty(),
        "created: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    Ok(())
}
