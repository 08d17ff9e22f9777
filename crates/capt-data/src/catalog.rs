//! The benchmark datasets with CoOp's folder names, split files and prompt templates.

use std::fmt;
use std::str::FromStr;

use crate::error::DataError;

/// How a dataset's splits are defined on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `split_zhou_<Name>.json` in the dataset folder, paths relative to `image_dir`.
    SplitFile { split_file: &'static str },
    /// FGVCAircraft: `variants.txt` + `images_variant_{train,val,test}.txt`.
    Aircraft,
    /// ImageNet: `classnames.txt` + `images/{train,val}/<wnid>/`.
    ImageNet,
    /// ImageNet-V2: `<image_dir>/<label>/` for labels 0..999, names from `classnames.txt`.
    ImageNetV2,
    /// ImageNet-Sketch/-A/-R: `<image_dir>/<wnid>/` for the wnids present (A and R hold
    /// 200-class subsets), names from `classnames.txt`.
    ImageNetFolders,
    /// A user folder; see `readers::read_custom`.
    Custom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatasetKind {
    ImageNet,
    Caltech101,
    OxfordPets,
    StanfordCars,
    OxfordFlowers,
    Food101,
    FgvcAircraft,
    Sun397,
    Dtd,
    EuroSat,
    Ucf101,
    ImageNetV2,
    ImageNetSketch,
    ImageNetA,
    ImageNetR,
    Custom,
}

impl DatasetKind {
    pub const ALL: [DatasetKind; 16] = [
        DatasetKind::ImageNet,
        DatasetKind::Caltech101,
        DatasetKind::OxfordPets,
        DatasetKind::StanfordCars,
        DatasetKind::OxfordFlowers,
        DatasetKind::Food101,
        DatasetKind::FgvcAircraft,
        DatasetKind::Sun397,
        DatasetKind::Dtd,
        DatasetKind::EuroSat,
        DatasetKind::Ucf101,
        DatasetKind::ImageNetV2,
        DatasetKind::ImageNetSketch,
        DatasetKind::ImageNetA,
        DatasetKind::ImageNetR,
        DatasetKind::Custom,
    ];

    /// CoOp's dataset (class) name.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::ImageNet => "ImageNet",
            DatasetKind::Caltech101 => "Caltech101",
            DatasetKind::OxfordPets => "OxfordPets",
            DatasetKind::StanfordCars => "StanfordCars",
            DatasetKind::OxfordFlowers => "OxfordFlowers",
            DatasetKind::Food101 => "Food101",
            DatasetKind::FgvcAircraft => "FGVCAircraft",
            DatasetKind::Sun397 => "SUN397",
            DatasetKind::Dtd => "DescribableTextures",
            DatasetKind::EuroSat => "EuroSAT",
            DatasetKind::Ucf101 => "UCF101",
            DatasetKind::ImageNetV2 => "ImageNetV2",
            DatasetKind::ImageNetSketch => "ImageNetSketch",
            DatasetKind::ImageNetA => "ImageNetA",
            DatasetKind::ImageNetR => "ImageNetR",
            DatasetKind::Custom => "custom",
        }
    }

    /// Extra accepted spellings (compared after lower-casing and dropping `-`, `_`, spaces).
    fn aliases(self) -> &'static [&'static str] {
        match self {
            DatasetKind::ImageNet => &["imagenet1k", "in1k"],
            DatasetKind::Caltech101 => &["caltech", "caltech-101"],
            DatasetKind::OxfordPets => &["pets", "oxford_pets"],
            DatasetKind::StanfordCars => &["cars", "stanford_cars"],
            DatasetKind::OxfordFlowers => &["flowers", "flowers102", "oxford_flowers"],
            DatasetKind::Food101 => &["food", "food-101"],
            DatasetKind::FgvcAircraft => &["aircraft", "fgvc", "fgvc_aircraft"],
            DatasetKind::Sun397 => &["sun"],
            DatasetKind::Dtd => &["dtd", "textures"],
            DatasetKind::EuroSat => &[],
            DatasetKind::Ucf101 => &["ucf"],
            DatasetKind::ImageNetV2 => &["imagenet-v2"],
            DatasetKind::ImageNetSketch => &["imagenet-sketch"],
            DatasetKind::ImageNetA => &["imagenet-a", "imagenet-adversarial"],
            DatasetKind::ImageNetR => &["imagenet-r", "imagenet-rendition"],
            DatasetKind::Custom => &["folder"],
        }
    }

    /// Folder under `$DATA` (empty for `Custom`, whose root is the dataset folder itself).
    pub fn dataset_dir(self) -> &'static str {
        match self {
            DatasetKind::ImageNet => "imagenet",
            DatasetKind::Caltech101 => "caltech-101",
            DatasetKind::OxfordPets => "oxford_pets",
            DatasetKind::StanfordCars => "stanford_cars",
            DatasetKind::OxfordFlowers => "oxford_flowers",
            DatasetKind::Food101 => "food-101",
            DatasetKind::FgvcAircraft => "fgvc_aircraft",
            DatasetKind::Sun397 => "sun397",
            DatasetKind::Dtd => "dtd",
            DatasetKind::EuroSat => "eurosat",
            DatasetKind::Ucf101 => "ucf101",
            DatasetKind::ImageNetV2 => "imagenetv2",
            DatasetKind::ImageNetSketch => "imagenet-sketch",
            DatasetKind::ImageNetA => "imagenet-adversarial",
            DatasetKind::ImageNetR => "imagenet-rendition",
            DatasetKind::Custom => "",
        }
    }

    /// Image folder relative to the dataset folder ("" = the dataset folder itself).
    pub fn image_dir(self) -> &'static str {
        match self {
            DatasetKind::ImageNet => "images",
            DatasetKind::Caltech101 => "101_ObjectCategories",
            DatasetKind::OxfordPets => "images",
            DatasetKind::StanfordCars => "",
            DatasetKind::OxfordFlowers => "jpg",
            DatasetKind::Food101 => "images",
            DatasetKind::FgvcAircraft => "images",
            DatasetKind::Sun397 => "SUN397",
            DatasetKind::Dtd => "images",
            DatasetKind::EuroSat => "2750",
            DatasetKind::Ucf101 => "UCF-101-midframes",
            DatasetKind::ImageNetV2 => "imagenetv2-matched-frequency-format-val",
            DatasetKind::ImageNetSketch => "images",
            DatasetKind::ImageNetA => "imagenet-a",
            DatasetKind::ImageNetR => "imagenet-r",
            DatasetKind::Custom => "",
        }
    }

    pub fn layout(self) -> Layout {
        let split = |split_file| Layout::SplitFile { split_file };
        match self {
            DatasetKind::ImageNet => Layout::ImageNet,
            DatasetKind::Caltech101 => split("split_zhou_Caltech101.json"),
            DatasetKind::OxfordPets => split("split_zhou_OxfordPets.json"),
            DatasetKind::StanfordCars => split("split_zhou_StanfordCars.json"),
            DatasetKind::OxfordFlowers => split("split_zhou_OxfordFlowers.json"),
            DatasetKind::Food101 => split("split_zhou_Food101.json"),
            DatasetKind::FgvcAircraft => Layout::Aircraft,
            DatasetKind::Sun397 => split("split_zhou_SUN397.json"),
            DatasetKind::Dtd => split("split_zhou_DescribableTextures.json"),
            DatasetKind::EuroSat => split("split_zhou_EuroSAT.json"),
            DatasetKind::Ucf101 => split("split_zhou_UCF101.json"),
            DatasetKind::ImageNetV2 => Layout::ImageNetV2,
            DatasetKind::ImageNetSketch | DatasetKind::ImageNetA | DatasetKind::ImageNetR => {
                Layout::ImageNetFolders
            }
            DatasetKind::Custom => Layout::Custom,
        }
    }

    /// Zero-shot prompt template (CoOp's `CUSTOM_TEMPLATES`; `{}` is the class name).
    pub fn template(self) -> &'static str {
        match self {
            DatasetKind::OxfordPets => "a photo of a {}, a type of pet.",
            DatasetKind::OxfordFlowers => "a photo of a {}, a type of flower.",
            DatasetKind::FgvcAircraft => "a photo of a {}, a type of aircraft.",
            DatasetKind::Dtd => "{} texture.",
            DatasetKind::EuroSat => "a centered satellite photo of {}.",
            DatasetKind::Food101 => "a photo of {}, a type of food.",
            DatasetKind::Ucf101 => "a photo of a person doing {}.",
            _ => "a photo of a {}.",
        }
    }

    /// Test-only domain-generalisation targets (train = test = all images, no val).
    pub fn is_test_only(self) -> bool {
        matches!(
            self,
            DatasetKind::ImageNetV2
                | DatasetKind::ImageNetSketch
                | DatasetKind::ImageNetA
                | DatasetKind::ImageNetR
        )
    }

    /// Whether CoOp also few-shot samples the val split (all but ImageNet, whose val is
    /// its test set).
    pub fn fewshot_val(self) -> bool {
        self != DatasetKind::ImageNet
    }

    /// Where CoOp's split file for this dataset can be obtained (for error messages).
    pub fn split_fix(self) -> String {
        match self.layout() {
            Layout::SplitFile { split_file } => format!(
                "download {split_file} as described in CoOp's DATASETS.md (github.com/KaiyangZhou/CoOp) \
                 into the {} folder, pass --split-file, or use `--dataset custom` on a folder per class",
                self.dataset_dir()
            ),
            _ => "lay the dataset out as in CoOp's DATASETS.md".to_string(),
        }
    }

    fn known_names() -> String {
        Self::ALL
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// CoOp's readable EuroSAT class names (folder name -> prompt name).
pub const EUROSAT_CLASSNAMES: [(&str, &str); 10] = [
    ("AnnualCrop", "Annual Crop Land"),
    ("Forest", "Forest"),
    ("HerbaceousVegetation", "Herbaceous Vegetation Land"),
    ("Highway", "Highway or Road"),
    ("Industrial", "Industrial Buildings"),
    ("Pasture", "Pasture Land"),
    ("PermanentCrop", "Permanent Crop Land"),
    ("Residential", "Residential Buildings"),
    ("River", "River"),
    ("SeaLake", "Sea or Lake"),
];

fn squash(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '-' | '_' | ' '))
        .flat_map(char::to_lowercase)
        .collect()
}

impl FromStr for DatasetKind {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, DataError> {
        let key = squash(s);
        Self::ALL
            .iter()
            .copied()
            .find(|k| {
                squash(k.name()) == key
                    || squash(k.dataset_dir()) == key && !key.is_empty()
                    || k.aliases().iter().any(|a| squash(a) == key)
            })
            .ok_or_else(|| DataError::UnknownDataset {
                name: s.to_string(),
                known: Self::known_names(),
            })
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The class name as it goes into a prompt: CoOp's prompt learners replace `_` by spaces.
pub fn prompt_classname(classname: &str) -> String {
    classname.replace('_', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases_parse() {
        for k in DatasetKind::ALL {
            assert_eq!(k.name().parse::<DatasetKind>().unwrap(), k);
        }
        assert_eq!("dtd".parse::<DatasetKind>().unwrap(), DatasetKind::Dtd);
        assert_eq!(
            "oxford_pets".parse::<DatasetKind>().unwrap(),
            DatasetKind::OxfordPets
        );
        assert_eq!(
            "imagenet-r".parse::<DatasetKind>().unwrap(),
            DatasetKind::ImageNetR
        );
        assert_eq!(
            "fgvc_aircraft".parse::<DatasetKind>().unwrap(),
            DatasetKind::FgvcAircraft
        );
        assert_eq!(
            "sun397".parse::<DatasetKind>().unwrap(),
            DatasetKind::Sun397
        );
    }

    #[test]
    fn unknown_name_lists_known() {
        let e = "mnist".parse::<DatasetKind>().unwrap_err().to_string();
        assert!(
            e.contains("\"mnist\"") && e.contains("OxfordPets") && e.contains("custom"),
            "{e}"
        );
    }

    #[test]
    fn templates_follow_the_method_spec() {
        assert_eq!(DatasetKind::Dtd.template(), "{} texture.");
        assert_eq!(DatasetKind::ImageNet.template(), "a photo of a {}.");
        assert_eq!(
            DatasetKind::Ucf101.template(),
            "a photo of a person doing {}."
        );
        assert_eq!(prompt_classname("Apply_Eye_Makeup"), "Apply Eye Makeup");
    }
}
