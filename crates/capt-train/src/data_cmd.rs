//! `capt-train data ...`: dataset checks and few-shot splits (the work is in capt-data).
use std::path::PathBuf;
use std::process::ExitCode;

use capt_data::{
    check_dataset, CacheOutcome, Dataset, DatasetKind, FewShotCache, LoadOptions, Protocol,
    Subsample,
};

#[derive(clap::Args)]
pub struct DataArgs {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(clap::Subcommand)]
enum DataCommand {
    /// Validate a dataset folder: counts per split and class, and every missing or
    /// undecodable image and bad split entry (exit status 1 if there is any).
    Check(CheckArgs),
    /// Sample (or load) the few-shot split CoOp's way and print its sizes; writes
    /// split_fewshot/shot_K-seed_S.json unless --no-cache.
    Fewshot(FewshotArgs),
    /// Print the paths of a few test images, one per class (the first of each of the first N
    /// classes): sample inputs for `capt-edge classify`, from the split file as training sees it.
    Samples(SamplesArgs),
}

#[derive(clap::Args)]
struct SamplesArgs {
    #[command(flatten)]
    data: DatasetArgs,
    /// How many classes to take an image from.
    #[arg(long, default_value_t = 3)]
    n: usize,
}

/// The dataset a command reads (`data *`, `fit`, `eval`, `zeroshot`).
#[derive(clap::Args, Clone)]
pub(crate) struct DatasetArgs {
    /// Dataset name (CoOp's: OxfordPets, DescribableTextures, ImageNet, ..., or `custom`).
    #[arg(long, value_name = "NAME")]
    pub dataset: DatasetKind,
    /// CoOp's $DATA folder (holding oxford_pets/, dtd/, ...); for `custom`, the dataset folder.
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
    /// Use this split file instead of the dataset's split_zhou_*.json (relative paths are
    /// looked up in the dataset folder).
    #[arg(long, value_name = "FILE")]
    pub split_file: Option<PathBuf>,
}

impl DatasetArgs {
    fn options(&self) -> LoadOptions {
        LoadOptions {
            split_file: self.split_file.clone(),
            ..LoadOptions::new(self.dataset, &self.root)
        }
    }
}

#[derive(clap::Args)]
struct CheckArgs {
    #[command(flatten)]
    data: DatasetArgs,
    /// Only check that images exist (skip decoding).
    #[arg(long)]
    no_decode: bool,
}

#[derive(clap::Args)]
struct FewshotArgs {
    #[command(flatten)]
    data: DatasetArgs,
    /// Images per class to sample from train (and from val, at most 4, as CoOp).
    #[arg(long, default_value_t = 16)]
    shots: usize,
    /// Sampling seed (CoOp's seeds are 1, 2, 3).
    #[arg(long, default_value_t = 1)]
    seed: i64,
    /// all, base or new.
    #[arg(long, default_value = "all")]
    subsample: Subsample,
    /// Cache folder (default: the dataset's split_fewshot/).
    #[arg(long, value_name = "DIR", conflicts_with = "no_cache")]
    cache_dir: Option<PathBuf>,
    /// Neither read nor write the few-shot cache (split_fewshot/shot_K-seed_S.json).
    #[arg(long)]
    no_cache: bool,
}

pub fn run(args: DataArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        DataCommand::Check(a) => {
            let report = check_dataset(&a.data.options(), !a.no_decode);
            print!("{}", report.render());
            Ok(if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        DataCommand::Samples(a) => {
            let ds = Dataset::load_with(&a.data.options())?;
            let mut seen = std::collections::BTreeSet::new();
            for d in ds.test() {
                if seen.len() == a.n {
                    break;
                }
                if seen.insert(d.label) {
                    println!(
                        "{}",
                        capt_data::fsutil::join_rel(&ds.image_dir, &d.impath).display()
                    );
                }
            }
            if seen.is_empty() {
                anyhow::bail!("{} has no test images", ds.name);
            }
            Ok(ExitCode::SUCCESS)
        }
        DataCommand::Fewshot(a) => {
            let ds = Dataset::load_with(&a.data.options())?;
            let mut p = Protocol::new(a.shots, a.seed, a.subsample);
            p.cache = match (a.no_cache, a.cache_dir) {
                (true, _) => FewShotCache::Off,
                (false, Some(d)) => FewShotCache::Dir(d),
                (false, None) => FewShotCache::DatasetDir,
            };
            let (out, outcome) = ds.with_protocol(&p)?;
            let how = match outcome {
                CacheOutcome::Loaded => "loaded from cache",
                CacheOutcome::Sampled => "sampled and cached",
                CacheOutcome::SampledNotSaved => "sampled (cache not writable)",
                CacheOutcome::Disabled => "sampled (no cache)",
            };
            println!(
                "{} {}-shot seed {} subsample {}: {how}",
                out.name, a.shots, a.seed, a.subsample
            );
            println!(
                "classes {}  train {}  val {}  test {}",
                out.num_classes(),
                out.train().len(),
                out.val().len(),
                out.test().len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
