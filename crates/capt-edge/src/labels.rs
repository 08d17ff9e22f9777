//! `add-class` / `remove-class`: edit the label set of an exported model in place.
//!
//! New classes get `t_c` from the exported `text_encoder.onnx` (learned contexts baked in),
//! candidates from the text-similarity prior over the zero-shot embeddings, SEM pair
//! embeddings from the same encoder and empty confusion cells — as the method specifies
//! (docs/METHOD.md §6). The existing classes keep their tables (their bank counts are not part
//! of the export); a removed class is replaced in other classes' candidate lists by the
//! strongest prior partner. The classifier is then re-emitted from its own parameters by the
//! very graph code the exporter used (`capt_model::graphs::classifier`), written under a new
//! content-named file, and `capt.json` is switched to it atomically: a reader sees the old
//! model or the new one, never a mix. The re-emitted classifier keeps the export's precision:
//! f16 compute (`precision: "f16"` in the manifest) is applied again with
//! `capt_onnx::to_f16_compute`, f16 / int8 weight storage is detected from the initializers.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use capt_backend::{FileEntry, ModelDir, MANIFEST_FILE};
use capt_core::ClipTokenizer;
use capt_graph::{DType, HostTensor};
use capt_method::bank::{text_similarity_prior, top_candidates};
use capt_model::{graphs, names, tokens, ModelSpec, TextFamily};
use capt_onnx::{pb, BuildOptions, Dim, F16Options, ModelMeta, OnnxBuilder};

#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error(transparent)]
    ModelDir(#[from] capt_backend::ModelDirError),
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Onnx(#[from] capt_onnx::Error),
    #[error(transparent)]
    Model(#[from] capt_model::ModelError),
    #[error(transparent)]
    Graph(#[from] capt_graph::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, LabelError>;

/// What an edit did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClassEdit {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub classes: usize,
    /// The classifier file now named by `capt.json`.
    pub classifier: String,
    pub seconds: f64,
}

/// The exported model opened for editing.
struct Editor {
    md: ModelDir,
    spec: ModelSpec,
    model: pb::ModelProto,
    params: BTreeMap<String, HostTensor>,
    tok: ClipTokenizer,
}

fn f32_rows(t: &HostTensor, what: &str) -> Result<(usize, usize, Vec<f32>)> {
    let v = t
        .as_f32()
        .ok_or_else(|| LabelError::Input(format!("`{what}` is not float")))?;
    let rows = t.dims().first().copied().unwrap_or(0);
    let width = v.len().checked_div(rows).unwrap_or(0);
    Ok((rows, width, v.to_vec()))
}

fn normalise(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter().map(|x| x / n).collect()
}

impl Editor {
    fn open(dir: &Path) -> Result<Self> {
        let md = ModelDir::open(dir)?;
        let spec_json = md.manifest.model_spec.as_ref().ok_or_else(|| {
            LabelError::Input(format!(
                "{} was not written by capt-export (no `model_spec` in {MANIFEST_FILE}); re-export the model with capt-export to edit its classes",
                dir.display()
            ))
        })?;
        let spec = ModelSpec::from_json(spec_json)?;
        let path = md.classifier_path();
        let model = capt_onnx::read_model(&path)?;
        let params = capt_onnx::read_params(&model)?;
        let tok = ClipTokenizer::bundled().map_err(|e| LabelError::Tokenizer(e.to_string()))?;
        Ok(Self {
            md,
            spec,
            model,
            params,
            tok,
        })
    }

    fn text_encoder(&self) -> Result<PathBuf> {
        let entry = self
            .md
            .manifest
            .files
            .text_encoder
            .as_ref()
            .ok_or_else(|| {
                LabelError::Input(format!(
                "{} has no text_encoder.onnx; re-export without --no-text-encoder to add classes",
                self.md.root.display()
            ))
            })?;
        self.md.verify_file("text_encoder", entry)?;
        Ok(self.md.root.join(&entry.path))
    }

    /// Embeddings `[D]` of `(family, a, b)` prompts, one text-encoder run for all of them.
    fn encode(&self, rows: &[(TextFamily, String, String)]) -> Result<Vec<Vec<f32>>> {
        if rows.is_empty() {
            return Ok(vec![]);
        }
        let path = self.text_encoder()?;
        let len = self.spec.clip.text.max_position_embeddings;
        let vocab = self.spec.clip.text.vocab_size;
        let mut lists = Vec::with_capacity(rows.len());
        for (fam, a, b) in rows {
            let text = self.spec.text.text(*fam, a, b);
            let ids = self
                .tok
                .encode(&text)
                .map_err(|e| LabelError::Tokenizer(format!("{text:?}: {e}")))?;
            // Checks the fit with the family's context tokens.
            tokens::rows(
                &[(text.clone(), ids.clone())],
                vocab,
                len,
                self.spec.text.ctx_len(*fam),
            )?;
            lists.push((text, ids));
        }
        let ids = tokens::rows(&lists, vocab, len, 0)?;
        let outs = capt_onnx::run_tract(&path, &[ids])?;
        let d = self.spec.clip.projection_dim;
        rows.iter()
            .enumerate()
            .map(|(i, (fam, _, _))| {
                let k = self
                    .spec
                    .text
                    .families
                    .iter()
                    .position(|f| f == fam)
                    .ok_or_else(|| {
                        LabelError::Input(format!(
                            "text_encoder.onnx has no `{}` output; re-export the model",
                            fam.output()
                        ))
                    })?;
                let v = outs[k]
                    .as_f32()
                    .ok_or_else(|| LabelError::Input("text encoder output is not float".into()))?;
                Ok(v[i * d..(i + 1) * d].to_vec())
            })
            .collect()
    }

    /// Prior-only `Nhat` (zero counts) over `names`, from zero-shot text embeddings.
    fn prior(&self, names: &[String]) -> Result<Vec<f32>> {
        let zs = self.encode(&zero_shot_rows(names))?;
        self.prior_from(&zs)
    }

    /// Prior-only `Nhat` from the classes' zero-shot embeddings (one per class, in order).
    fn prior_from(&self, zs: &[Vec<f32>]) -> Result<Vec<f32>> {
        let capt = self.spec.capt.as_ref().expect("head implies a CAPT config");
        let zs: Vec<Vec<f32>> = zs.iter().map(|v| normalise(v)).collect();
        let c = zs.len();
        let mut sim = vec![0.0f32; c * c];
        for i in 0..c {
            for j in 0..c {
                sim[i * c + j] = zs[i].iter().zip(&zs[j]).map(|(a, b)| a * b).sum();
            }
        }
        text_similarity_prior(
            &vec![0.0; c * c],
            c,
            &sim,
            capt.bank.prior_beta,
            capt.bank.prior_temperature,
        )
        .map_err(|e| LabelError::Input(e.to_string()))
    }

    /// Whether the classifier stores any initializer as `dtype` (f16 / int8 weight storage,
    /// kept when the classifier is re-emitted; f16 compute stores FLOAT16 too, told apart by
    /// the manifest).
    fn stores(&self, dtype: pb::tensor_proto::DataType) -> bool {
        self.model
            .graph
            .as_ref()
            .is_some_and(|g| g.initializer.iter().any(|t| t.data_type == dtype as i32))
    }

    fn table(&self, name: &str) -> Result<&HostTensor> {
        self.params.get(name).ok_or_else(|| {
            LabelError::Input(format!(
                "the classifier has no `{name}`; re-export the model with this capt version"
            ))
        })
    }

    /// Re-emits the classifier for `class_names` and switches the manifest to it.
    fn write(mut self, class_names: Vec<String>) -> Result<String> {
        self.spec.num_classes = class_names.len();
        self.spec.validate()?;
        // Parameters come back widened to f32 (`read_params`); f16-rounded values convert
        // back to the same f16 bits, so an unchanged class keeps its exact weights.
        let f16_compute = match self.md.manifest.precision.as_str() {
            "f32" => false,
            "f16" => true,
            other => {
                return Err(LabelError::Input(format!(
                    "{} has precision {other:?}; this capt-edge re-emits f32 or f16 classifiers, upgrade it to edit the classes",
                    self.md.root.display()
                )))
            }
        };
        let f16_storage = !f16_compute && self.stores(pb::tensor_proto::DataType::Float16);
        let int8 = self.stores(pb::tensor_proto::DataType::Int8);
        let b = OnnxBuilder::new(
            std::mem::take(&mut self.params),
            BuildOptions {
                weights_f16: f16_storage,
                ..Default::default()
            },
        );
        let s = self.spec.clip.vision.image_size;
        let x = b.input(
            "pixel_values",
            DType::F32,
            &[Dim::Sym("N".into()), 3.into(), s.into(), s.into()],
        )?;
        let out = graphs::classifier(&b, &self.spec, &x)?;
        b.output("logits", &out.logits)?;
        b.output("probs", &out.probs)?;
        let mut metadata: BTreeMap<String, String> = self
            .model
            .metadata_props
            .iter()
            .filter(|p| p.key != capt_onnx::FILE_BYTES_KEY)
            .map(|p| (p.key.clone(), p.value.clone()))
            .collect();
        metadata.insert(
            "capt.class_names".into(),
            serde_json::to_string(&class_names).expect("strings serialise"),
        );
        metadata.insert("capt.model_spec".into(), self.spec.to_json().to_string());
        let graph_name = self
            .model
            .graph
            .as_ref()
            .map(|g| g.name.clone())
            .unwrap_or_default();
        let mut model = b.finish(&ModelMeta {
            graph_name,
            doc_string: self.model.doc_string.clone(),
            model_version: self.model.model_version + 1,
            metadata,
        })?;
        if int8 {
            capt_onnx::quantize_weights_int8(&mut model, capt_onnx::INT8_MIN_ELEMS)?;
        }
        if f16_compute {
            capt_onnx::to_f16_compute(&mut model, &F16Options::default())?;
        }
        let root = self.md.root.clone();
        let staging = root.join(".classifier.next.onnx");
        capt_onnx::write_model(&staging, &model, &Default::default())?;
        let sha = capt_backend::sha256_file(&staging)?;
        let file = format!("classifier-{}.onnx", &sha[..12]);
        let dest = root.join(&file);
        std::fs::rename(&staging, &dest).map_err(|source| LabelError::Io {
            path: dest.clone(),
            source,
        })?;
        let old = self.md.classifier_path();
        let mut manifest = self.md.manifest.clone();
        manifest.class_names = class_names;
        manifest.model_spec = Some(self.spec.to_json());
        manifest.files.classifier = FileEntry {
            path: file.clone(),
            sha256: sha,
        };
        let text = serde_json::to_string_pretty(&manifest).expect("manifest serialises") + "\n";
        capt_onnx::write_atomic(&root.join(MANIFEST_FILE), |f| {
            std::io::Write::write_all(f, text.as_bytes())
        })?;
        if old != dest {
            let _ = std::fs::remove_file(&old);
        }
        Ok(file)
    }
}

/// Zero-shot template rows of `names` for the text encoder.
fn zero_shot_rows(names: &[String]) -> Vec<(TextFamily, String, String)> {
    names
        .iter()
        .map(|n| (TextFamily::ZeroShot, n.clone(), String::new()))
        .collect()
}

fn check_names(names: &[String]) -> Result<()> {
    if names.is_empty() {
        return Err(LabelError::Input("no class names given".into()));
    }
    let mut seen = HashSet::new();
    for n in names {
        if n.trim().is_empty() {
            return Err(LabelError::Input("a class name is empty".into()));
        }
        if !seen.insert(n.as_str()) {
            return Err(LabelError::Input(format!("`{n}` is given twice")));
        }
    }
    Ok(())
}

/// Per-pair tables of one candidate row.
struct Cand {
    j: usize,
    w: f32,
    com: Vec<f32>,
    dif: Vec<f32>,
    rev: Vec<f32>,
    cells: Vec<i64>,
}

/// The CAPT tables as rows of candidates.
struct Tables {
    k: usize,
    m2: usize,
    rows: Vec<Vec<Cand>>,
}

impl Tables {
    fn read(e: &Editor) -> Result<Self> {
        let idx = e.table(names::CAND_INDEX)?;
        let (c, k) = match idx.dims() {
            [c, k] => (*c, *k),
            d => return Err(LabelError::Input(format!("cand_index has shape {d:?}"))),
        };
        let index = idx
            .as_i64()
            .ok_or_else(|| LabelError::Input("cand_index is not int64".into()))?;
        let w = f32_rows(e.table(names::CAND_WEIGHT)?, "cand_weight")?.2;
        let com = f32_rows(e.table(names::T_COM)?, "t_com")?.2;
        let dif = f32_rows(e.table(names::T_DIF)?, "t_dif")?.2;
        let rev = f32_rows(e.table(names::T_DIF_REV)?, "t_dif_rev")?.2;
        let cells_t = e.table(names::CELLS)?;
        let cells = cells_t
            .as_i64()
            .ok_or_else(|| LabelError::Input("cells is not int64".into()))?;
        let d = e.spec.clip.projection_dim;
        let m2 = cells.len() / (c * k).max(1);
        let rows = (0..c)
            .map(|y| {
                (0..k)
                    .map(|i| {
                        let r = y * k + i;
                        Cand {
                            j: index[r] as usize,
                            w: w[r],
                            com: com[r * d..(r + 1) * d].to_vec(),
                            dif: dif[r * d..(r + 1) * d].to_vec(),
                            rev: rev[r * d..(r + 1) * d].to_vec(),
                            cells: cells[r * m2..(r + 1) * m2].to_vec(),
                        }
                    })
                    .collect()
            })
            .collect();
        Ok(Self { k, m2, rows })
    }

    /// Fills rows shorter than `k` from the prior (`nhat`, over the new class order),
    /// encoding the new pairs; `names` is the new class order.
    fn refill(&mut self, e: &Editor, names: &[String], nhat: &[f32], k: usize) -> Result<()> {
        let c = names.len();
        let mut wanted: Vec<(usize, usize)> = Vec::new();
        for (y, row) in self.rows.iter().enumerate() {
            if row.len() >= k {
                continue;
            }
            let have: HashSet<usize> = row.iter().map(|x| x.j).collect();
            let extra = top_candidates(nhat, c, c.saturating_sub(1));
            let order = &extra.index[y * extra.k..(y + 1) * extra.k];
            for &j in order
                .iter()
                .filter(|&&j| !have.contains(&(j as usize)))
                .take(k - row.len())
            {
                wanted.push((y, j as usize));
            }
        }
        let mut prompts = Vec::new();
        for &(y, j) in &wanted {
            let (a, b) = (names[y].clone(), names[j].clone());
            prompts.push((TextFamily::Com, a.clone(), b.clone()));
            prompts.push((TextFamily::Dif, a.clone(), b.clone()));
            prompts.push((TextFamily::Dif, b, a));
        }
        let emb = e.encode(&prompts)?;
        for (n, &(y, j)) in wanted.iter().enumerate() {
            self.rows[y].push(Cand {
                j,
                w: nhat[y * c + j],
                com: emb[3 * n].clone(),
                dif: emb[3 * n + 1].clone(),
                rev: emb[3 * n + 2].clone(),
                cells: vec![-1; self.m2],
            });
        }
        for row in self.rows.iter_mut() {
            row.truncate(k);
        }
        self.k = k;
        Ok(())
    }

    fn store(self, e: &mut Editor) -> Result<()> {
        let (c, k, d) = (self.rows.len(), self.k, e.spec.clip.projection_dim);
        let all = || self.rows.iter().flatten();
        let ins = |e: &mut Editor, name: &str, t: HostTensor| {
            e.params.insert(name.to_string(), t);
        };
        ins(
            e,
            names::CAND_INDEX,
            HostTensor::i64(vec![c, k], all().map(|x| x.j as i64).collect())?,
        );
        ins(
            e,
            names::CAND_WEIGHT,
            HostTensor::f32(vec![c, k], all().map(|x| x.w).collect())?,
        );
        ins(
            e,
            names::T_COM,
            HostTensor::f32(vec![c, k, d], all().flat_map(|x| x.com.clone()).collect())?,
        );
        ins(
            e,
            names::T_DIF,
            HostTensor::f32(vec![c, k, d], all().flat_map(|x| x.dif.clone()).collect())?,
        );
        ins(
            e,
            names::T_DIF_REV,
            HostTensor::f32(vec![c, k, d], all().flat_map(|x| x.rev.clone()).collect())?,
        );
        let m = self.m2 / 2;
        ins(
            e,
            names::CELLS,
            HostTensor::i64(
                vec![c, k, 2, m],
                all().flat_map(|x| x.cells.clone()).collect(),
            )?,
        );
        if let Some(capt) = e.spec.capt.as_mut() {
            // Pin the candidate count the tables now have.
            capt.sem.k_cand = k;
        }
        Ok(())
    }
}

/// Adds `new` classes to the model in `dir`.
pub fn add_classes(dir: &Path, new: &[String]) -> Result<ClassEdit> {
    let t0 = Instant::now();
    check_names(new)?;
    let mut e = Editor::open(dir)?;
    let old = e.md.manifest.class_names.clone();
    if let Some(dup) = new.iter().find(|n| old.contains(n)) {
        return Err(LabelError::Input(format!(
            "`{dup}` is already a class of {}",
            dir.display()
        )));
    }
    let mut all = old.clone();
    all.extend(new.iter().cloned());
    let head = e.spec.head()?.is_some();
    // One text-encoder run: class embeddings t_c of the new names, then (CAPT) the zero-shot
    // embeddings of every class for the prior.
    let mut rows: Vec<_> = new
        .iter()
        .map(|n| (TextFamily::Class, n.clone(), String::new()))
        .collect();
    if head {
        rows.extend(zero_shot_rows(&all));
    }
    let emb = e.encode(&rows)?;
    let (class_rows, zs) = emb.split_at(new.len());
    let (c, d, mut class_emb) = f32_rows(e.table(names::CLASS_EMB)?, "class_emb")?;
    for v in class_rows {
        class_emb.extend_from_slice(v);
    }
    if head {
        let nhat = e.prior_from(zs)?;
        let mut t = Tables::read(&e)?;
        let k = t.k;
        t.rows.extend(new.iter().map(|_| Vec::new()));
        t.refill(&e, &all, &nhat, k)?;
        t.store(&mut e)?;
    }
    e.params.insert(
        names::CLASS_EMB.into(),
        HostTensor::f32(vec![c + new.len(), d], class_emb)?,
    );
    let file = e.write(all.clone())?;
    Ok(ClassEdit {
        added: new.to_vec(),
        removed: vec![],
        classes: all.len(),
        classifier: file,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Removes classes from the model in `dir`.
pub fn remove_classes(dir: &Path, gone: &[String]) -> Result<ClassEdit> {
    let t0 = Instant::now();
    check_names(gone)?;
    let mut e = Editor::open(dir)?;
    let old = e.md.manifest.class_names.clone();
    if let Some(missing) = gone.iter().find(|n| !old.contains(n)) {
        return Err(LabelError::Input(format!(
            "`{missing}` is not a class of {}",
            dir.display()
        )));
    }
    let keep: Vec<usize> = (0..old.len())
        .filter(|&i| !gone.contains(&old[i]))
        .collect();
    let head = e.spec.head()?.is_some();
    let min = if head { 2 } else { 1 };
    if keep.len() < min {
        return Err(LabelError::Input(format!(
            "removing {} of {} classes leaves {}; the classifier needs at least {min}",
            gone.len(),
            old.len(),
            keep.len()
        )));
    }
    let kept: Vec<String> = keep.iter().map(|&i| old[i].clone()).collect();
    let (_, d, class_emb) = f32_rows(e.table(names::CLASS_EMB)?, "class_emb")?;
    let class_emb: Vec<f32> = keep
        .iter()
        .flat_map(|&i| class_emb[i * d..(i + 1) * d].to_vec())
        .collect();
    if head {
        let mut new_index = vec![usize::MAX; old.len()];
        for (n, &i) in keep.iter().enumerate() {
            new_index[i] = n;
        }
        let mut t = Tables::read(&e)?;
        let rows = std::mem::take(&mut t.rows);
        t.rows = keep
            .iter()
            .map(|&i| {
                rows[i]
                    .iter()
                    .filter(|x| new_index[x.j] != usize::MAX)
                    .map(|x| Cand {
                        j: new_index[x.j],
                        w: x.w,
                        com: x.com.clone(),
                        dif: x.dif.clone(),
                        rev: x.rev.clone(),
                        cells: x.cells.clone(),
                    })
                    .collect()
            })
            .collect();
        let k = t.k.min(kept.len() - 1);
        let short = t.rows.iter().any(|r| r.len() < k);
        let nhat = if short { e.prior(&kept)? } else { vec![] };
        if short {
            t.refill(&e, &kept, &nhat, k)?;
        } else {
            t.rows.iter_mut().for_each(|r| r.truncate(k));
            t.k = k;
        }
        t.store(&mut e)?;
    }
    e.params.insert(
        names::CLASS_EMB.into(),
        HostTensor::f32(vec![kept.len(), d], class_emb)?,
    );
    let file = e.write(kept.clone())?;
    Ok(ClassEdit {
        added: vec![],
        removed: gone.to_vec(),
        classes: kept.len(),
        classifier: file,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
