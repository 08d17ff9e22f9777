//! Decoding and augmentation throughput on real images (the shipped CoOp-layout images in
//! ../shared/data/coop_data via their split_mini files, or $CAPT_COOP_DATA; the repository
//! fixtures otherwise). Prints images/s for decode only, decode + test transform and
//! decode + train augmentation, on a rayon pool of $CAPT_BENCH_THREADS (default 2) threads.
//!
//!     cargo bench -p capt-data --bench decode_augment

use std::path::PathBuf;
use std::time::Instant;

use capt_core::{load_image, PreprocessConfig};
use capt_data::{view_rng, Dataset, DatasetKind, LoadOptions, TrainAugment};
use rayon::prelude::*;

fn images() -> (String, Vec<PathBuf>) {
    let real = std::env::var_os("CAPT_COOP_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/coop_data")
        });
    let mut paths = Vec::new();
    let mut what = Vec::new();
    if real.join("dtd").is_dir() {
        for (kind, file) in [
            (DatasetKind::OxfordPets, "split_mini_OxfordPets.json"),
            (DatasetKind::Dtd, "split_mini_DescribableTextures.json"),
            (DatasetKind::Caltech101, "split_mini_Caltech101.json"),
        ] {
            let ds =
                Dataset::load_with(&LoadOptions::new(kind, &real).with_split_file(file)).unwrap();
            let before = paths.len();
            for split in capt_data::Split::ALL {
                paths.extend(ds.split(split).iter().map(|d| ds.image_path(d)));
            }
            what.push(format!("{} {}", kind.name(), paths.len() - before));
        }
        (
            format!("real images from {} ({})", real.display(), what.join(", ")),
            paths,
        )
    } else {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/coop");
        let ds = Dataset::load(DatasetKind::Dtd, &root).unwrap();
        for split in capt_data::Split::ALL {
            paths.extend(ds.split(split).iter().map(|d| ds.image_path(d)));
        }
        (
            format!(
                "fixture images from {} (real data not found)",
                root.display()
            ),
            paths,
        )
    }
}

fn bench(name: &str, paths: &[PathBuf], f: impl Fn(usize, &PathBuf) -> usize + Sync) {
    // One warm-up pass (page cache), then the timed pass.
    let _: usize = paths.par_iter().enumerate().map(|(i, p)| f(i, p)).sum();
    let t = Instant::now();
    let check: usize = paths.par_iter().enumerate().map(|(i, p)| f(i, p)).sum();
    let s = t.elapsed().as_secs_f64();
    println!(
        "{name:<34} {:>5} images in {s:>6.2} s = {:>7.1} images/s  ({check} values)",
        paths.len(),
        paths.len() as f64 / s
    );
}

fn main() {
    let threads: usize = std::env::var("CAPT_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let (what, paths) = images();
    println!("decode/augment throughput: {what}");
    let test = PreprocessConfig::clip(224);
    let aug = TrainAugment::clip(224);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        println!("threads: {}", rayon::current_num_threads());
        bench("decode", &paths, |_, p| {
            let img = load_image(p).unwrap();
            (img.width() * img.height()) as usize
        });
        bench("decode + test transform (224)", &paths, |_, p| {
            test.preprocess(&load_image(p).unwrap()).len()
        });
        bench("decode + train augmentation (224)", &paths, |i, p| {
            aug.augment_chw(&load_image(p).unwrap(), &mut view_rng(0, 0, i as u64))
                .len()
        });
    });
}
