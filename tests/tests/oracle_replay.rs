//! The oracle's replay on the host against transcripts recorded under real
//! Xen (the kernel's `ORACLE` lines with `pvmmu.oracle_lines`, cut after
//! 2,000 requests): the Xen model must print exactly what Xen printed, line
//! for line. The domU transcript (an `xl` guest) holds the refusals of
//! cache attributes and cache flushes without I/O privilege. The three were
//! recorded again (same seeds: `pvmmu.seed` is the header's seed xor
//! 0x0a11ce00) when the request mix gained `MMUEXT_FLUSH_CACHE(_GLOBAL)`;
//! the half-validated ("stuck") tables the first dom0 transcript taught the
//! model are kept by the model's own tests (`model/tests.rs`).

use pvmmu::model::{DomainKind, ModelNegativeEnv};
use pvmmu::oracle::{self, End};

/// Runs the model for the transcript's seed and as many requests as it
/// holds; returns (the transcript's request lines, the model's).
fn replay(transcript: &str, kind: DomainKind) -> (Vec<String>, Vec<String>) {
    let mut lines = transcript.lines();
    let header = lines.next().expect("a header line");
    let seed = header
        .split_whitespace()
        .find_map(|f| f.strip_prefix("seed=0x"))
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .expect("a seed in the header");
    let xen: Vec<String> = lines.map(str::to_string).collect();
    let mut env = ModelNegativeEnv::new(kind, 16 * 1024).expect("the model boots");
    let mut model = Vec::new();
    let mut end = None;
    oracle::run(
        &mut env,
        seed,
        xen.len() as u32,
        &mut |b| assert_eq!(b.seed, seed),
        &mut |line| model.push(line.to_string()),
        &mut |e| end = Some(e),
    );
    assert_eq!(
        end,
        Some(End::Done {
            requests: xen.len() as u32,
            leaked: 0
        })
    );
    (xen, model)
}

fn assert_same(xen: &[String], model: &[String]) {
    assert_eq!(xen.len(), model.len());
    if let Some((n, (x, m))) = xen.iter().zip(model).enumerate().find(|(_, (x, m))| x != m) {
        panic!("request {n}: Xen `{x}`, model `{m}`");
    }
}

#[test]
fn the_model_replays_a_xen_4_17_dom0_transcript() {
    let (xen, model) = replay(
        include_str!("../fixtures/oracle-xen-4.17-dom0.txt"),
        DomainKind::Hardware,
    );
    assert_eq!(xen.len(), 2_000);
    assert_same(&xen, &model);
}

#[test]
fn the_model_replays_a_xen_4_20_dom0_transcript() {
    let (xen, model) = replay(
        include_str!("../fixtures/oracle-xen-4.20-dom0.txt"),
        DomainKind::Hardware,
    );
    assert_eq!(xen.len(), 2_000);
    assert_same(&xen, &model);
}

#[test]
fn the_model_replays_a_xen_4_17_xl_domu_transcript() {
    let text = include_str!("../fixtures/oracle-xen-4.17-domu.txt");
    let (xen, model) = replay(text, DomainKind::Unprivileged);
    assert_eq!(xen.len(), 2_000);
    assert_same(&xen, &model);
    // The domain kind matters: the same seed as dom0 answers otherwise.
    let (_, as_dom0) = replay(text, DomainKind::Hardware);
    assert_ne!(as_dom0, xen);
}
