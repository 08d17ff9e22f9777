//! Symbolic values of the ONNX graph builder and their shape algebra.

use capt_graph::{DType, Error, Result};

/// One dimension of a symbolic value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A size fixed at export time.
    Known(usize),
    /// A named run-time size (`dim_param`), e.g. the batch `"N"`.
    Sym(String),
    /// A run-time size with no name (result of shape algebra the builder cannot follow).
    Unknown,
}

impl Dim {
    pub fn known(&self) -> Option<usize> {
        match self {
            Dim::Known(d) => Some(*d),
            _ => None,
        }
    }
}

impl From<usize> for Dim {
    fn from(d: usize) -> Self {
        Dim::Known(d)
    }
}

impl From<&str> for Dim {
    fn from(s: &str) -> Self {
        Dim::Sym(s.to_string())
    }
}

/// A value of the graph being built: the ONNX value name plus its element type and the
/// dims known at export time.
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    pub(crate) name: String,
    pub(crate) dtype: DType,
    pub(crate) dims: Vec<Dim>,
}

impl Value {
    /// The ONNX value name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn dims(&self) -> &[Dim] {
        &self.dims
    }

    pub fn rank(&self) -> usize {
        self.dims.len()
    }
}

/// Broadcast of two symbolic dims (`None` when they cannot broadcast).
fn broadcast_dim(a: &Dim, b: &Dim) -> Option<Dim> {
    use Dim::*;
    Some(match (a, b) {
        (x, y) if x == y && *x != Unknown => x.clone(),
        (Known(1), y) => y.clone(),
        (x, Known(1)) => x.clone(),
        (Known(x), Known(y)) if x != y => return None,
        // A known size > 1 fixes a run-time one (it must match at run time).
        (Known(x), _) | (_, Known(x)) => Known(*x),
        _ => Unknown,
    })
}

/// numpy broadcasting of symbolic shapes.
pub(crate) fn broadcast(op: &'static str, shapes: &[&[Dim]]) -> Result<Vec<Dim>> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![Dim::Known(1); rank];
    for s in shapes {
        let off = rank - s.len();
        for (i, d) in s.iter().enumerate() {
            out[off + i] = broadcast_dim(&out[off + i], d).ok_or_else(|| {
                Error::op(
                    op,
                    format!("shapes {} do not broadcast", fmt_shapes(shapes)),
                )
            })?;
        }
    }
    Ok(out)
}

pub(crate) fn fmt_dims(d: &[Dim]) -> String {
    let parts: Vec<String> = d
        .iter()
        .map(|d| match d {
            Dim::Known(k) => k.to_string(),
            Dim::Sym(s) => s.clone(),
            Dim::Unknown => "?".into(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

fn fmt_shapes(shapes: &[&[Dim]]) -> String {
    shapes
        .iter()
        .map(|s| fmt_dims(s))
        .collect::<Vec<_>>()
        .join(" and ")
}

/// ONNX `Reshape` (allowzero = 0) on symbolic dims. `-1` resolves to a known size, to a
/// single symbol when the symbols cancel (e.g. `[N, 4, 3] -> [-1, 12]` gives `N`), else to
/// `Unknown`.
pub(crate) fn reshape_dims(op: &'static str, input: &[Dim], spec: &[i64]) -> Result<Vec<Dim>> {
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &s) in spec.iter().enumerate() {
        match s {
            0 => out.push(input.get(i).cloned().ok_or_else(|| {
                Error::op(
                    op,
                    format!(
                        "0 at position {i} but the input {} has no such dim",
                        fmt_dims(input)
                    ),
                )
            })?),
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(Dim::Known(1));
            }
            s if s > 0 => out.push(Dim::Known(s as usize)),
            _ => return Err(Error::op(op, format!("invalid target shape {spec:?}"))),
        }
    }
    // Split both sides into a known product and a list of symbolic factors.
    let split = |d: &[Dim]| {
        let mut k = 1usize;
        let mut syms = vec![];
        let mut unknown = false;
        for x in d {
            match x {
                Dim::Known(v) => k *= v,
                Dim::Sym(s) => syms.push(s.clone()),
                Dim::Unknown => unknown = true,
            }
        }
        (k, syms, unknown)
    };
    let (ki, mut si, ui) = split(input);
    let (ko, so, uo) = split(&out);
    let mismatch = || {
        Error::op(
            op,
            format!("cannot reshape {} to {spec:?}", fmt_dims(input)),
        )
    };
    match infer {
        Some(i) => {
            if ui || uo {
                out[i] = Dim::Unknown;
            } else {
                for s in &so {
                    match si.iter().position(|x| x == s) {
                        Some(p) => {
                            si.remove(p);
                        }
                        None => {
                            out[i] = Dim::Unknown;
                            return Ok(out);
                        }
                    }
                }
                if ko == 0 || ki % ko != 0 {
                    return Err(mismatch());
                }
                let k = ki / ko;
                out[i] = match (si.len(), k) {
                    (0, k) => Dim::Known(k),
                    (1, 1) => Dim::Sym(si.remove(0)),
                    _ => Dim::Unknown,
                };
            }
        }
        None => {
            let (mut si, mut so) = (si, so);
            si.sort();
            so.sort();
            if !ui && !uo && (ki != ko || si != so) {
                return Err(mismatch());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n() -> Dim {
        Dim::Sym("N".into())
    }

    #[test]
    fn broadcast_keeps_symbols() {
        let a = [n(), Dim::Known(1), Dim::Known(5)];
        let b = [Dim::Known(3), Dim::Known(1)];
        assert_eq!(
            broadcast("t", &[&a, &b]).unwrap(),
            vec![n(), Dim::Known(3), Dim::Known(5)]
        );
        assert!(broadcast("t", &[&[Dim::Known(2)], &[Dim::Known(3)]]).is_err());
    }

    #[test]
    fn reshape_symbolic() {
        let x = [n(), Dim::Known(4), Dim::Known(3)];
        assert_eq!(
            reshape_dims("t", &x, &[-1, 12]).unwrap(),
            vec![n(), Dim::Known(12)]
        );
        assert_eq!(
            reshape_dims("t", &x, &[0, 2, 2, 3]).unwrap(),
            vec![n(), Dim::Known(2), Dim::Known(2), Dim::Known(3)]
        );
        assert_eq!(
            reshape_dims("t", &x, &[0, -1]).unwrap(),
            vec![n(), Dim::Known(12)]
        );
        assert_eq!(reshape_dims("t", &x, &[-1]).unwrap(), vec![Dim::Unknown]);
        assert!(reshape_dims("t", &x, &[0, 5]).is_err());
        assert!(reshape_dims("t", &x, &[0, -1, 5]).is_err());
    }
}
