//! `kubectl kustomize manifests/` (what `kubectl apply -k manifests/` builds)
//! with kubectl 1.20's embedded kustomize (v2.0.3, the project's pinned
//! server version) and with the current `kubectl` on PATH: both must render
//! the whole install, CRD included. A kubectl that is not there is skipped
//! with a note (no server is needed either way).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn kubectls() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(home) = std::env::var_os("HOME") {
        let old = PathBuf::from(home).join(".cache/streampipe/kubernetes-1.20.2/bin/kubectl");
        if old.exists() {
            out.push(old);
        } else {
            eprintln!("skipped: no kubectl 1.20 at {}", old.display());
        }
    }
    out.push(PathBuf::from("kubectl"));
    out
}

#[test]
fn manifests_kustomize_with_kubectl_1_20_and_current() {
    let mut ran = 0;
    for k in kubectls() {
        let out = match Command::new(&k)
            .args(["kustomize"])
            .arg(repo().join("manifests"))
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                eprintln!("skipped {}: {e}", k.display());
                continue;
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{} kustomize manifests/: {}",
            k.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        for kind in [
            "kind: CustomResourceDefinition",
            "kind: Namespace",
            "kind: ServiceAccount",
            "kind: Deployment",
        ] {
            assert!(
                stdout.contains(kind),
                "{} kustomize manifests/ lacks {kind}",
                k.display()
            );
        }
        assert!(stdout.contains("name: streampipelines.streampipe.dev"));
        ran += 1;
    }
    eprintln!("kustomize checked with {ran} kubectl(s)");
}
