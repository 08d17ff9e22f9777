//! Training and evaluation batches on the DTD fixture.

mod common;

use std::collections::HashSet;

use capt_core::{load_image, PreprocessConfig};
use capt_data::{DataLoader, Dataset, DatasetKind, Split, TrainAugment};

fn dtd() -> Dataset {
    Dataset::load(DatasetKind::Dtd, common::fixture_root()).unwrap()
}

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn train_batches_are_shuffled_augmented_and_reproducible() {
    let ds = dtd();
    let loader = DataLoader::train(&ds, 8, 42, TrainAugment::clip(32)).unwrap();
    assert_eq!(
        loader.len(),
        2,
        "20 images, batch 8, last partial batch dropped"
    );
    let batches: Vec<_> = in_pool(2, || loader.epoch(0).map(Result::unwrap).collect());
    assert_eq!(batches.len(), 2);
    let mut seen = HashSet::new();
    for b in &batches {
        assert_eq!(b.images.shape(), [8, 3, 32, 32]);
        assert_eq!(b.images.data.len(), 8 * 3 * 32 * 32);
        for (&i, &l) in b.indices.iter().zip(&b.labels) {
            assert_eq!(loader.items()[i].label, l);
            assert!(seen.insert(i));
        }
    }
    assert_ne!(loader.order(0), (0..20).collect::<Vec<_>>());
    assert_ne!(loader.order(0), loader.order(1));

    // Same seed and epoch: identical pixels, whatever the thread count.
    let again: Vec<_> = in_pool(1, || loader.epoch(0).map(Result::unwrap).collect());
    assert_eq!(batches[0].images, again[0].images);
    assert_eq!(batches[1].indices, again[1].indices);
    // Another epoch re-augments the same image differently.
    let i = batches[0].indices[0];
    let e1 = loader.load_batch(&[i], 1).unwrap();
    let e0 = loader.load_batch(&[i], 0).unwrap();
    assert_eq!(e0.images.data[..], batches[0].images.data[..3 * 32 * 32]);
    assert_ne!(e0.images, e1.images);
}

#[test]
fn eval_batches_use_the_foundation_preprocessing() {
    let ds = dtd();
    let cfg = PreprocessConfig::clip(32);
    let loader = DataLoader::eval(&ds, Split::Test, 8, cfg.clone()).unwrap();
    let batches: Vec<_> = loader.epoch(0).map(Result::unwrap).collect();
    assert_eq!(
        batches.iter().map(|b| b.images.n).collect::<Vec<_>>(),
        [8, 8, 4]
    );
    assert_eq!(batches[2].indices, (16..20).collect::<Vec<_>>());
    let first = cfg.preprocess(&load_image(&ds.image_path(&ds.test()[0])).unwrap());
    assert_eq!(batches[0].images.data[..first.len()], first[..]);
    assert_eq!(batches[0].labels[0], ds.test()[0].label);
}

#[test]
fn batch_size_zero_is_rejected() {
    let e = DataLoader::train(&dtd(), 0, 0, TrainAugment::clip(32))
        .unwrap_err()
        .to_string();
    assert!(e.contains("batch size"), "{e}");
}
