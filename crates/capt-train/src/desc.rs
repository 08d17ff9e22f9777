//! Description embeddings of the optional SEM descriptions file (`sem.descriptions`): each
//! key's sentences are encoded by the frozen text encoder and averaged; a pair's average is
//! added to `t_com(a, b)` (or of `b|a` when only that order is described: commonality is
//! symmetric) and to `t_dif(a, b)`; a class's average is added to every `t_dif(class, j)`
//! (what sets the class apart).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Tensor, D};
use capt_method::descriptions::Descriptions;

use crate::backbone::Backbone;
use crate::error::{Result, TrainError};
use crate::prompts::Family;

#[derive(Debug, Clone, Default)]
pub struct DescEmbeddings {
    classes: HashMap<usize, Tensor>,
    pairs: HashMap<(usize, usize), Tensor>,
}

impl DescEmbeddings {
    pub fn load(
        path: &Path,
        backbone: &Backbone,
        classnames: &[String],
        chunk: usize,
    ) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TrainError::io("read descriptions file", path, e))?;
        let d = Descriptions::parse(&text, classnames, &path.display().to_string())?;
        let mean = |sentences: &[String]| -> Result<Tensor> {
            Ok(backbone.encode_texts(sentences, chunk)?.mean(0)?)
        };
        let mut out = Self::default();
        for (c, s) in &d.classes {
            out.classes.insert(*c, mean(s)?);
        }
        for (p, s) in &d.pairs {
            out.pairs.insert(*p, mean(s)?);
        }
        tracing::info!(classes = out.classes.len(), pairs = out.pairs.len(), file = %path.display(), "loaded SEM descriptions");
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.classes.is_empty() && self.pairs.is_empty()
    }

    fn extra(&self, family: Family, a: usize, b: usize) -> Option<Tensor> {
        let pair = self.pairs.get(&(a, b)).or_else(|| match family {
            Family::Com => self.pairs.get(&(b, a)),
            Family::Dif => None,
        });
        let class = match family {
            Family::Dif => self.classes.get(&a),
            Family::Com => None,
        };
        match (pair, class) {
            (Some(p), Some(c)) => (p + c).ok(),
            (Some(p), None) => Some(p.clone()),
            (None, Some(c)) => Some(c.clone()),
            (None, None) => None,
        }
    }

    /// `emb [P, D]` plus each pair's description embedding (zero where it has none).
    pub fn add_to_pairs(
        &self,
        emb: &Tensor,
        family: Family,
        pairs: &[(usize, usize)],
    ) -> Result<Tensor> {
        let d = emb.dim(D::Minus1)?;
        let zero = Tensor::zeros(d, emb.dtype(), emb.device())?;
        let mut any = false;
        let rows: Vec<Tensor> = pairs
            .iter()
            .map(|&(a, b)| match self.extra(family, a, b) {
                Some(t) => {
                    any = true;
                    t
                }
                None => zero.clone(),
            })
            .collect();
        if !any {
            return Ok(emb.clone());
        }
        Ok((emb + Tensor::stack(&rows, 0)?.to_dtype(emb.dtype())?)?)
    }
}
