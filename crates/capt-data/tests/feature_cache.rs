//! The feature cache encodes each image once, is reused by a second run, and is
//! invalidated by a new backbone id or changed image bytes.

mod common;

use std::cell::{Cell, RefCell};

use capt_core::ImageBatch;
use capt_data::{
    Dataset, DatasetKind, EncodedViews, FeatureCache, FeatureCacheConfig, FrozenImageEncoder,
    TrainAugment,
};

/// Counts calls and views; features are simple statistics of each view's pixels so a test
/// can tell views and images apart.
struct MockEncoder {
    id: RefCell<String>,
    calls: Cell<usize>,
    views: Cell<usize>,
}

impl MockEncoder {
    fn new(id: &str) -> Self {
        Self {
            id: RefCell::new(id.to_string()),
            calls: Cell::new(0),
            views: Cell::new(0),
        }
    }
}

const DIM: usize = 4;
const TOKENS: usize = 16;

impl FrozenImageEncoder for MockEncoder {
    fn backbone_id(&self) -> String {
        self.id.borrow().clone()
    }

    fn encode(
        &self,
        batch: &ImageBatch,
    ) -> Result<EncodedViews, Box<dyn std::error::Error + Send + Sync>> {
        self.calls.set(self.calls.get() + 1);
        self.views.set(self.views.get() + batch.n);
        let per = 3 * batch.height * batch.width;
        let mut global = Vec::new();
        let mut local = Vec::new();
        for i in 0..batch.n {
            let v = &batch.data[i * per..(i + 1) * per];
            let mean = v.iter().sum::<f32>() / per as f32;
            let g: Vec<f32> = (0..DIM).map(|d| mean * (d + 1) as f32 + v[d * 7]).collect();
            for t in 0..TOKENS {
                local.extend(g.iter().map(|x| x + t as f32));
            }
            global.extend(g);
        }
        Ok(EncodedViews {
            n: batch.n,
            dim: DIM,
            local_tokens: TOKENS,
            global,
            local,
        })
    }
}

#[test]
fn cache_is_reused_and_invalidated() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::copy_tree(&common::fixture_root().join("dtd"), &data.join("dtd"));
    let ds = Dataset::load(DatasetKind::Dtd, &data).unwrap();
    let items = &ds.train()[..6];
    let mut cfg = FeatureCacheConfig::new(tmp.path().join("cache"), 3, 11, TrainAugment::clip(32));
    cfg.images_per_call = 4;
    let cache = FeatureCache::new(cfg).unwrap();
    let enc = MockEncoder::new("mock-vit@1");

    // First run: every image encoded, 3 views each, in ceil(6 / 4) = 2 calls.
    let (first, stats) = cache.features(&enc, &ds.image_dir, items).unwrap();
    assert_eq!((stats.hits, stats.encoded, stats.encode_calls), (0, 6, 2));
    assert_eq!((enc.calls.get(), enc.views.get()), (2, 18));
    assert_eq!(first.len(), 6);
    assert_eq!(
        (first[0].views, first[0].dim, first[0].local_tokens),
        (3, DIM, TOKENS)
    );
    assert_ne!(
        first[0].global_view(0),
        first[0].global_view(1),
        "views are different augmentations"
    );
    assert_ne!(first[0].global, first[1].global);
    assert_eq!(
        first[0].local_view(2)[TOKENS * DIM - 1],
        first[0].global_view(2)[DIM - 1] + 15.0
    );

    // Second run (a fresh cache object, as in a new process): nothing re-encoded.
    let cache2 = FeatureCache::new(cache.config().clone()).unwrap();
    let (second, stats) = cache2.features(&enc, &ds.image_dir, items).unwrap();
    assert_eq!((stats.hits, stats.encoded, stats.encode_calls), (6, 0, 0));
    assert_eq!(enc.calls.get(), 2, "no encoder call on the second run");
    assert_eq!(second, first);

    // A changed image is re-encoded alone.
    let changed = ds.image_path(&items[2]);
    std::fs::copy(ds.image_path(&ds.train()[10]), &changed).unwrap();
    let (third, stats) = cache2.features(&enc, &ds.image_dir, items).unwrap();
    assert_eq!((stats.hits, stats.encoded, stats.encode_calls), (5, 1, 1));
    assert_ne!(third[2], first[2]);
    assert_eq!(third[3], first[3]);

    // A different backbone re-encodes everything.
    *enc.id.borrow_mut() = "mock-vit@2".into();
    let (_, stats) = cache2.features(&enc, &ds.image_dir, items).unwrap();
    assert_eq!((stats.hits, stats.encoded), (0, 6));

    // A corrupt cache file is ignored and rewritten.
    let key = cache2.key("mock-vit@2", &sha256_file(&ds.image_path(&items[0])));
    std::fs::write(cache2.path_for(&key), b"garbage").unwrap();
    let (_, stats) = cache2.features(&enc, &ds.image_dir, items).unwrap();
    assert_eq!((stats.hits, stats.encoded), (5, 1));
    let (_, stats) = cache2.features(&enc, &ds.image_dir, items).unwrap();
    assert_eq!((stats.hits, stats.encoded), (6, 0));
}

#[test]
fn duplicate_images_are_encoded_once_and_bad_encoders_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = Dataset::load(DatasetKind::Dtd, common::fixture_root()).unwrap();
    let items = vec![ds.train()[0].clone(), ds.train()[0].clone()];
    let cache = FeatureCache::new(FeatureCacheConfig::new(
        tmp.path(),
        2,
        0,
        TrainAugment::clip(16),
    ))
    .unwrap();
    let enc = MockEncoder::new("m");
    let (f, stats) = cache.features(&enc, &ds.image_dir, &items).unwrap();
    assert_eq!(stats.encoded, 1);
    assert_eq!(f[0], f[1]);

    struct Broken;
    impl FrozenImageEncoder for Broken {
        fn backbone_id(&self) -> String {
            "broken".into()
        }
        fn encode(
            &self,
            batch: &ImageBatch,
        ) -> Result<EncodedViews, Box<dyn std::error::Error + Send + Sync>> {
            Ok(EncodedViews {
                n: batch.n,
                dim: 4,
                local_tokens: 16,
                global: vec![0.0; 3],
                local: vec![],
            })
        }
    }
    let e = cache
        .features(&Broken, &ds.image_dir, &items)
        .unwrap_err()
        .to_string();
    assert!(e.contains("broken") && e.contains("3 global"), "{e}");
}

fn sha256_file(p: &std::path::Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}
