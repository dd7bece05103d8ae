//! Python values to engine types and back: hyperparameter dicts, optimizer-state dicts, f32
//! arrays.

use numpy::{PyArray1, PyReadonlyArray1, PyReadwriteArray1};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyTuple};
use sparktorch_optim::{HyperValue, Hyperparameters, OptimizerState};

use crate::errors::param_err;

/// `{"lr": 0.1, "nesterov": True, "betas": (0.9, 0.999)}` as hyperparameters.
pub(crate) fn hyperparameters(py: Python<'_>, d: &Bound<'_, PyAny>) -> PyResult<Hyperparameters> {
    let dict = d
        .cast::<PyDict>()
        .map_err(|_| param_err(py, "hyperparameters must be a dict of name -> value"))?;
    let mut out = Vec::with_capacity(dict.len());
    for (k, v) in dict.iter() {
        let name: String = k
            .extract()
            .map_err(|_| param_err(py, "hyperparameters: every key must be a str"))?;
        out.push((name.clone(), hyper_value(py, &name, &v)?));
    }
    Ok(out)
}

fn hyper_value(py: Python<'_>, name: &str, v: &Bound<'_, PyAny>) -> PyResult<HyperValue> {
    if v.is_instance_of::<PyBool>() {
        return Ok(HyperValue::Bool(v.extract()?));
    }
    if v.is_instance_of::<PyFloat>() || v.is_instance_of::<PyInt>() {
        return Ok(HyperValue::Float(v.extract()?));
    }
    if v.is_instance_of::<PyTuple>() || v.is_instance_of::<PyList>() {
        if let Ok((a, b)) = v.extract::<(f64, f64)>() {
            return Ok(HyperValue::Pair(a, b));
        }
    }
    // numpy scalars and other number-likes.
    if let Ok(f) = v.extract::<f64>() {
        return Ok(HyperValue::Float(f));
    }
    Err(param_err(
        py,
        format!("hyperparameters[{name:?}] must be a float, a bool or a pair of floats, got {v}"),
    ))
}

/// Hyperparameters as a dict.
pub(crate) fn hyper_dict<'py>(
    py: Python<'py>,
    h: &Hyperparameters,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in h {
        match v {
            HyperValue::Float(f) => d.set_item(k, *f)?,
            HyperValue::Bool(b) => d.set_item(k, *b)?,
            HyperValue::Pair(a, b) => d.set_item(k, (*a, *b))?,
        }
    }
    Ok(d)
}

/// The optimizer state dict of `ParameterServer.optimizer_state()`.
pub(crate) fn state_dict<'py>(
    py: Python<'py>,
    name: &str,
    hyper: &Hyperparameters,
    state: OptimizerState,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", name)?;
    d.set_item("hyperparameters", hyper_dict(py, hyper)?)?;
    d.set_item("step", state.step)?;
    let scalars = PyDict::new(py);
    for (k, v) in &state.scalars {
        scalars.set_item(k, *v)?;
    }
    d.set_item("scalars", scalars)?;
    let buffers = PyDict::new(py);
    for (k, v) in state.buffers {
        buffers.set_item(k, PyArray1::from_vec(py, v))?;
    }
    d.set_item("buffers", buffers)?;
    Ok(d)
}

/// Parse a state dict: `(name, hyperparameters if given, state)`.
pub(crate) fn parse_state(
    py: Python<'_>,
    d: &Bound<'_, PyAny>,
) -> PyResult<(Option<String>, Option<Hyperparameters>, OptimizerState)> {
    let dict = d
        .cast::<PyDict>()
        .map_err(|_| param_err(py, "state must be a dict (see optimizer_state())"))?;
    let name = match dict.get_item("name")? {
        Some(n) => Some(
            n.extract::<String>()
                .map_err(|_| param_err(py, "state['name'] must be a str"))?,
        ),
        None => None,
    };
    let hyper = match dict.get_item("hyperparameters")? {
        Some(h) => Some(hyperparameters(py, &h)?),
        None => None,
    };
    let step = match dict.get_item("step")? {
        Some(s) => s
            .extract::<u64>()
            .map_err(|_| param_err(py, "state['step'] must be an int >= 0"))?,
        None => 0,
    };
    let mut scalars = Vec::new();
    if let Some(s) = dict.get_item("scalars")? {
        let s = s
            .cast::<PyDict>()
            .map_err(|_| param_err(py, "state['scalars'] must be a dict"))?;
        for (k, v) in s.iter() {
            let k: String = k
                .extract()
                .map_err(|_| param_err(py, "state['scalars'] keys must be str"))?;
            let v: f64 = v
                .extract()
                .map_err(|_| param_err(py, format!("state['scalars'][{k:?}] must be a float")))?;
            scalars.push((k, v));
        }
    }
    let mut buffers = Vec::new();
    if let Some(b) = dict.get_item("buffers")? {
        let b = b
            .cast::<PyDict>()
            .map_err(|_| param_err(py, "state['buffers'] must be a dict"))?;
        for (k, v) in b.iter() {
            let k: String = k
                .extract()
                .map_err(|_| param_err(py, "state['buffers'] keys must be str"))?;
            let arr = f32_array(py, &v, &format!("state['buffers'][{k:?}]"))?;
            let values = arr
                .as_slice()
                .map_err(|_| param_err(py, format!("state['buffers'][{k:?}] must be contiguous")))?
                .to_vec();
            buffers.push((k, values));
        }
    }
    Ok((
        name,
        hyper,
        OptimizerState {
            step,
            scalars,
            buffers,
        },
    ))
}

/// A read-only 1-D float32 array, or a `ParamError` naming `what`.
pub(crate) fn f32_array<'py>(
    py: Python<'py>,
    v: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<PyReadonlyArray1<'py, f32>> {
    v.extract::<PyReadonlyArray1<'py, f32>>().map_err(|_| {
        param_err(
            py,
            format!("{what} must be a 1-D numpy array of dtype float32"),
        )
    })
}

/// A writable 1-D float32 array, or a `ParamError` naming `what`.
pub(crate) fn f32_array_mut<'py>(
    py: Python<'py>,
    v: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<PyReadwriteArray1<'py, f32>> {
    v.extract::<PyReadwriteArray1<'py, f32>>().map_err(|_| {
        param_err(
            py,
            format!("{what} must be a writable 1-D numpy array of dtype float32 (not borrowed elsewhere)"),
        )
    })
}
