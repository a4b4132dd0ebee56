//! FID against pytorch-fid (tests/reference/golden_fid.py): its Inception's
//! pool features on the same weights and pictures, the statistics, the
//! Frechet distance, and its `--save-stats` files.

mod common;

use swiftbrush_worker::eval::fid::{read_stats, write_stats};
use swiftbrush_worker::eval::{FeatureStats, FidNetwork, frechet_distance};
use tch::{Device, Kind, Tensor};

fn golden() -> std::collections::HashMap<String, Tensor> {
    common::golden("fid/golden.safetensors")
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    common::max_abs_diff(a, b) / b.abs().max().to_kind(Kind::Double).double_value(&[])
}

#[test]
fn pool_features_match_pytorch_fid() {
    tch::set_num_threads(1);
    let g = golden();
    let net = FidNetwork::load(
        &common::fixtures().join("fid/inception.safetensors"),
        Device::Cpu,
    )
    .unwrap();
    for side in ["a", "b"] {
        let got = net.features(&g[&format!("images_{side}")]).unwrap();
        let d = rel_diff(&got, &g[&format!("features_{side}")]);
        assert!(
            d <= 1e-4,
            "{side}: features differ by {d:e} of their largest"
        );
    }
}

#[test]
fn statistics_and_distance_match_pytorch_fid() {
    let g = golden();
    // Accumulated over two batches, as the command does.
    let mut stats = FeatureStats::new(2048);
    let f = &g["features_a"];
    stats.add(&f.narrow(0, 0, 4)).unwrap();
    stats.add(&f.narrow(0, 4, 2)).unwrap();
    assert_eq!(stats.count(), 6);
    let (mu, sigma) = stats.mean_and_cov().unwrap();
    assert!(rel_diff(&mu, &g["mu_a"]) <= 1e-9);
    assert!(rel_diff(&sigma, &g["sigma_a"]) <= 1e-9);

    // A full-rank case against scipy's sqrtm.
    let fid = frechet_distance(&g["mu_x"], &g["sigma_x"], &g["mu_y"], &g["sigma_y"]).unwrap();
    let want = g["fid_xy"].double_value(&[0]);
    assert!((fid - want).abs() <= 1e-8 * want, "{fid} vs {want}");
    // A distribution is at distance 0 from itself; the distance is symmetric.
    let zero = frechet_distance(&g["mu_x"], &g["sigma_x"], &g["mu_x"], &g["sigma_x"]).unwrap();
    assert!(zero.abs() <= 1e-8 * want, "{zero}");
    let back = frechet_distance(&g["mu_y"], &g["sigma_y"], &g["mu_x"], &g["sigma_x"]).unwrap();
    assert!((back - want).abs() <= 1e-8 * want);

    // pytorch-fid's --save-stats file reads as the same statistics, and
    // this tool's own file round-trips.
    let (mu_npz, sigma_npz) = read_stats(&common::fixtures().join("fid/stats_a.npz")).unwrap();
    assert!(mu_npz.equal(&g["mu_a"]) && sigma_npz.equal(&g["sigma_a"]));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("a.safetensors");
    write_stats(&path, &mu, &sigma).unwrap();
    let (mu2, sigma2) = read_stats(&path).unwrap();
    assert!(mu2.equal(&mu) && sigma2.equal(&sigma));

    // Files that are not statistics say what is wrong.
    let err = read_stats(&common::fixtures().join("fid/golden.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no `mu` array"), "{err}");
    let err = read_stats(&tmp.path().join("a.txt"))
        .unwrap_err()
        .to_string();
    assert!(err.contains(".npz"), "{err}");
}
