//! The learned tensors of a run, by checkpoint name (`prompt.ctx`, `prompt.deep.{k}`,
//! `prompt.visual.{k}`, `sem.com_ctx`, `sem.dif_ctx`, `capt.*`), kept sorted by name so every
//! iteration (optimiser, gradient norm, serialisation) has one fixed order.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone)]
pub struct ParamStore {
    vars: BTreeMap<String, Var>,
    /// F32, or F64 for gradient checks.
    dtype: DType,
}

impl ParamStore {
    pub fn new(dtype: DType) -> Self {
        Self {
            vars: BTreeMap::new(),
            dtype,
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Adds a learned tensor (converted to the store's dtype).
    pub fn insert(&mut self, name: impl Into<String>, value: &Tensor) -> Result<()> {
        let v = Var::from_tensor(&value.to_dtype(self.dtype)?.contiguous()?)?;
        self.vars.insert(name.into(), v);
        Ok(())
    }

    pub fn insert_data(
        &mut self,
        name: &str,
        shape: &[usize],
        data: Vec<f32>,
        device: &Device,
    ) -> Result<()> {
        let t = Tensor::from_vec(data, shape, device)?;
        self.insert(name, &t)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.vars.contains_key(name)
    }

    pub fn var(&self, name: &str) -> Result<&Var> {
        self.vars.get(name).ok_or_else(|| {
            TrainError::Config(format!(
                "learned tensor `{name}` does not exist in this run"
            ))
        })
    }

    /// The tensor (tracked: gradients reach the variable).
    pub fn get(&self, name: &str) -> Result<Tensor> {
        Ok(self.var(name)?.as_tensor().clone())
    }

    /// The tensor, `detach`ed when `grad` is false (no graph, fast kernels downstream).
    pub fn get_grad(&self, name: &str, grad: bool) -> Result<Tensor> {
        let t = self.get(name)?;
        Ok(if grad { t } else { t.detach() })
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.vars.iter()
    }

    pub fn names(&self) -> Vec<String> {
        self.vars.keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// Names starting with `prefix` with their (tracked) tensors.
    pub fn with_prefix(&self, prefix: &str) -> Vec<(String, Tensor)> {
        self.vars
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Number of learned scalars.
    pub fn numel(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Every tensor as safetensors bytes (F32, sorted names).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let tensors: Vec<(String, Tensor)> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        tensors_to_safetensors(&tensors, None)
    }

    /// Overwrites every variable from a file written by [`Self::to_safetensors`]; missing,
    /// extra or mis-shaped tensors are errors naming the tensor.
    pub fn load_safetensors(&mut self, bytes: &[u8], source: &Path) -> Result<()> {
        let loaded = read_safetensors(bytes, source, &self.device())?;
        for (name, var) in &self.vars {
            let t = loaded.get(name).ok_or_else(|| {
                TrainError::checkpoint(source, format!("learned tensor `{name}` is missing; the checkpoint was written by another method/config"))
            })?;
            if t.dims() != var.dims() {
                return Err(TrainError::checkpoint(
                    source,
                    format!(
                        "`{name}` has shape {:?}, this run expects {:?}",
                        t.dims(),
                        var.dims()
                    ),
                ));
            }
            var.set(&t.to_dtype(self.dtype)?)?;
        }
        if let Some(extra) = loaded.keys().find(|k| !self.vars.contains_key(*k)) {
            return Err(TrainError::checkpoint(
                source,
                format!("holds `{extra}`, which this run does not learn; the checkpoint was written by another method/config"),
            ));
        }
        Ok(())
    }

    fn device(&self) -> Device {
        self.vars
            .values()
            .next()
            .map(|v| v.device().clone())
            .unwrap_or(Device::Cpu)
    }
}

/// Serialises F32/I64 tensors (sorted by name) with optional metadata, through
/// [`capt_checkpoint::serialize_tensors`] (the exporter reads what it writes).
pub fn tensors_to_safetensors(
    tensors: &[(String, Tensor)],
    meta: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut host = std::collections::BTreeMap::new();
    for (name, t) in tensors {
        let t = t.to_device(&Device::Cpu)?;
        let t = if t.dtype() == DType::I64 {
            t
        } else {
            t.to_dtype(DType::F32)?
        };
        host.insert(name.clone(), capt_graph::HostTensor::from_candle(&t)?);
    }
    Ok(capt_checkpoint::serialize_tensors(&host, meta)?)
}

/// Reads F32 / I64 tensors of a safetensors file into candle tensors on `device` (parsed by
/// [`capt_checkpoint::parse_tensors`], the exporter's reader too).
pub fn read_safetensors(
    bytes: &[u8],
    source: &Path,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    capt_checkpoint::parse_tensors(bytes, source)?
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_candle(device, DType::F32)?)))
        .collect()
}
