//! The file: an atomic write and a validated read of one `safetensors` file (see the module
//! doc of [`super`] for its tensors and metadata).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use safetensors::tensor::{Dtype, SafeTensors, View};
use serde_json::{json, Value};
use sparktorch_optim::OptimizerState;
use sparktorch_proto::{Mode, MAX_PARAMS};

use super::json::{f64_json, hyper_json, json_f64, parse_hyper};
use super::time::iso8601;
use super::{
    resolve, Checkpoint, CheckpointError, EarlyStopState, WorkerState, CHECKPOINT_FILE,
    FORMAT_NAME, FORMAT_VERSION, MAX_BUFFERS, MAX_CHECKPOINT_BYTES,
};
use crate::layout::{layout_len, shape_len};
use crate::store::Layout;

/// Prefix of parameter tensor names.
const PARAM_PREFIX: &str = "param/";

/// Prefix of optimizer buffer tensor names.
const OPTIM_PREFIX: &str = "optim/";

/// One f32 slice as a safetensors tensor, written straight from memory.
struct F32View<'a> {
    /// The tensor's shape.
    shape: Vec<usize>,
    /// Its values.
    data: &'a [f32],
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        sparktorch_proto::payload::as_wire_bytes(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// Distinguishes the temp files of concurrent writers in one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Checkpoint {
    /// The `__metadata__` map.
    fn metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        put("format", FORMAT_NAME.to_string());
        put("format_version", FORMAT_VERSION.to_string());
        put("engine_version", self.engine_version.clone());
        put("mode", self.mode.as_str().to_string());
        put("version", self.version.to_string());
        put("optimizer", self.optimizer.clone());
        put(
            "hyperparameters",
            hyper_json(&self.hyperparameters).to_string(),
        );
        let scalars: serde_json::Map<String, Value> = self
            .optimizer_state
            .scalars
            .iter()
            .map(|(k, v)| (k.clone(), f64_json(*v)))
            .collect();
        put(
            "optimizer_state",
            json!({"step": self.optimizer_state.step, "scalars": scalars}).to_string(),
        );
        let workers: serde_json::Map<String, Value> = self
            .workers
            .iter()
            .map(|(w, s)| {
                (
                    w.to_string(),
                    json!({"next_step": s.next_step, "attempt": s.attempt}),
                )
            })
            .collect();
        put("workers", Value::Object(workers).to_string());
        put("num_workers", self.num_workers.to_string());
        put("layout", json!(self.layout).to_string());
        put("model_buffers", self.model_buffers.to_string());
        put(
            "early_stop",
            json!({
                "best_loss": self.early_stop.best_loss.map(f64_json),
                "bad_evaluations": self.early_stop.bad_evaluations,
                "should_stop": self.early_stop.should_stop,
            })
            .to_string(),
        );
        put("created_unix", self.created_unix.to_string());
        put("created", iso8601(self.created_unix));
        m
    }

    /// Write atomically to `path` (a file path): a temp file in the same directory, fsync,
    /// rename over `path`, fsync of the directory. On failure the temp file is removed and
    /// `path` is left as it was.
    pub fn write(&self, path: &Path) -> Result<(), CheckpointError> {
        let io = |op, source| CheckpointError::Io {
            path: path.to_path_buf(),
            op,
            source,
        };
        let invalid = |reason: String| CheckpointError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let n = self.params.len();
        let total = layout_len(&self.layout);
        if total != Some(n) {
            return Err(invalid(format!(
                "layout adds up to {total:?} elements, the parameters have {n}"
            )));
        }
        let mut tensors: Vec<(String, F32View<'_>)> = Vec::new();
        for (name, shape, data) in self.param_tensors() {
            tensors.push((
                format!("{PARAM_PREFIX}{name}"),
                F32View {
                    shape: shape.to_vec(),
                    data,
                },
            ));
        }
        for (name, buf) in &self.optimizer_state.buffers {
            tensors.push((
                format!("{OPTIM_PREFIX}{name}"),
                F32View {
                    shape: vec![buf.len()],
                    data: buf,
                },
            ));
        }
        let mut names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid(format!("two tensors are named {:?}", w[0])));
        }

        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| CHECKPOINT_FILE.to_string());
        let tmp = dir.join(format!(
            ".{file_name}.tmp-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            safetensors::tensor::serialize_to_file(tensors, Some(self.metadata()), &tmp).map_err(
                |e| match e {
                    safetensors::SafeTensorError::IoError(source) => {
                        io("write a temp file", source)
                    }
                    other => invalid(format!("cannot serialize: {other}")),
                },
            )?;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| io("fsync the temp file", e))?;
            std::fs::rename(&tmp, path).map_err(|e| io("rename the temp file over it", e))
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        // Make the rename durable. Some file systems refuse fsync on a directory: not an error.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Read and validate the checkpoint at `path` (a file, or a directory holding
    /// [`CHECKPOINT_FILE`]).
    pub fn read(path: &Path) -> Result<Self, CheckpointError> {
        let path = resolve(path);
        let io = |op, source| CheckpointError::Io {
            path: path.clone(),
            op,
            source,
        };
        let file = std::fs::File::open(&path).map_err(|e| io("open", e))?;
        let size = file.metadata().map_err(|e| io("stat", e))?.len();
        if size > MAX_CHECKPOINT_BYTES {
            return Err(CheckpointError::Invalid {
                path: path.clone(),
                reason: format!("{size} bytes exceed the bound of {MAX_CHECKPOINT_BYTES} bytes"),
            });
        }
        let mut bytes = Vec::with_capacity(size as usize);
        file.take(size)
            .read_to_end(&mut bytes)
            .map_err(|e| io("read", e))?;
        Self::from_bytes(&bytes).map_err(|reason| CheckpointError::Invalid { path, reason })
    }

    /// Parse and validate a whole checkpoint file held in memory; the error says what is wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| format!("not a readable safetensors file: {e}"))?;
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| format!("not a readable safetensors file: {e}"))?;
        let meta = header
            .metadata()
            .as_ref()
            .ok_or("no __metadata__: not a sparktorch checkpoint")?;
        let get = |k: &str| {
            meta.get(k)
                .map(String::as_str)
                .ok_or_else(|| format!("metadata key {k:?} is missing"))
        };
        let json = |k: &str| -> Result<Value, String> {
            serde_json::from_str(get(k)?).map_err(|e| format!("metadata {k:?} is not JSON: {e}"))
        };
        let num = |k: &str| -> Result<u64, String> {
            get(k)?
                .parse::<u64>()
                .map_err(|_| format!("metadata {k:?} is not a non-negative integer"))
        };

        let format = get("format")?;
        if format != FORMAT_NAME {
            return Err(format!(
                "format is {format:?}, expected {FORMAT_NAME:?}: not a sparktorch checkpoint"
            ));
        }
        let fv = num("format_version")?;
        if fv == 0 || fv > u64::from(FORMAT_VERSION) {
            return Err(format!(
                "format version {fv} is not supported (this engine reads 1..={FORMAT_VERSION})"
            ));
        }
        let engine_version = get("engine_version")?.to_string();
        let mode = Mode::parse(get("mode")?)
            .ok_or_else(|| format!("unknown mode {:?}", meta.get("mode")))?;
        let version = num("version")?;
        let optimizer = get("optimizer")?.to_string();
        if !sparktorch_optim::SUPPORTED
            .iter()
            .any(|s| s.eq_ignore_ascii_case(&optimizer))
        {
            return Err(format!("unknown optimizer {optimizer:?}"));
        }
        let hyperparameters = parse_hyper(&json("hyperparameters")?)?;
        let num_workers = u32::try_from(num("num_workers")?)
            .ok()
            .filter(|&n| n >= 1)
            .ok_or("num_workers must be in [1, 2^32)")?;
        let created_unix = num("created_unix")?;

        let ostate = json("optimizer_state")?;
        let step = ostate
            .get("step")
            .and_then(Value::as_u64)
            .ok_or("optimizer_state.step must be a non-negative integer")?;
        let mut scalars = Vec::new();
        match ostate.get("scalars") {
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    let f = json_f64(v)
                        .ok_or_else(|| format!("optimizer_state.scalars.{k} is not a number"))?;
                    scalars.push((k.clone(), f));
                }
            }
            _ => return Err("optimizer_state.scalars must be an object".into()),
        }

        let mut workers = BTreeMap::new();
        match json("workers")? {
            Value::Object(m) => {
                for (k, v) in m {
                    let w: u32 = k
                        .parse()
                        .map_err(|_| format!("workers: key {k:?} is not a worker id"))?;
                    let next_step = v
                        .get("next_step")
                        .and_then(Value::as_u64)
                        .ok_or_else(|| format!("workers.{k}.next_step must be an integer"))?;
                    let attempt = v
                        .get("attempt")
                        .and_then(Value::as_u64)
                        .and_then(|a| u32::try_from(a).ok())
                        .ok_or_else(|| format!("workers.{k}.attempt must be a u32"))?;
                    workers.insert(w, WorkerState { next_step, attempt });
                }
            }
            _ => return Err("workers must be an object".into()),
        }

        let es = json("early_stop")?;
        let best_loss = match es.get("best_loss") {
            None | Some(Value::Null) => None,
            Some(v) => Some(json_f64(v).ok_or("early_stop.best_loss is not a number")?),
        };
        let early_stop = EarlyStopState {
            best_loss,
            bad_evaluations: es
                .get("bad_evaluations")
                .and_then(Value::as_u64)
                .and_then(|b| u32::try_from(b).ok())
                .ok_or("early_stop.bad_evaluations must be a u32")?,
            should_stop: es
                .get("should_stop")
                .and_then(Value::as_bool)
                .ok_or("early_stop.should_stop must be a bool")?,
        };

        let layout: Layout = serde_json::from_value(json("layout")?)
            .map_err(|e| format!("layout must be a list of [name, shape]: {e}"))?;
        if layout.is_empty() {
            return Err("layout is empty".into());
        }
        let mut n: usize = 0;
        for (name, shape) in &layout {
            let len = shape_len(shape)
                .ok_or_else(|| format!("layout entry {name:?}: shape {shape:?} overflows"))?;
            n = n
                .checked_add(len)
                .filter(|&t| t <= MAX_PARAMS)
                .ok_or_else(|| format!("layout exceeds {MAX_PARAMS} elements"))?;
        }
        let model_buffers = match meta.get("model_buffers") {
            None => 0,
            Some(_) => usize::try_from(num("model_buffers")?)
                .ok()
                .filter(|&b| b <= n)
                .ok_or_else(|| format!("model_buffers exceeds the layout's {n} elements"))?,
        };
        let trainable = n - model_buffers;

        // Tensors: exactly one per layout entry, plus the optimizer buffers; all F32.
        let mut expected_params: BTreeMap<String, &Vec<usize>> = BTreeMap::new();
        for (name, shape) in &layout {
            if expected_params
                .insert(format!("{PARAM_PREFIX}{name}"), shape)
                .is_some()
            {
                return Err(format!("layout names {name:?} twice"));
            }
        }
        let mut buffer_names = Vec::new();
        for (name, view) in st.iter() {
            if view.dtype() != Dtype::F32 {
                return Err(format!(
                    "tensor {name:?} is {:?}, expected F32",
                    view.dtype()
                ));
            }
            if let Some(shape) = expected_params.get(name) {
                if view.shape() != shape.as_slice() {
                    return Err(format!(
                        "tensor {name:?} has shape {:?}, the layout says {shape:?}",
                        view.shape()
                    ));
                }
            } else if let Some(b) = name.strip_prefix(OPTIM_PREFIX) {
                if view.shape() != [trainable] {
                    return Err(format!(
                        "optimizer buffer {name:?} has shape {:?}, expected [{trainable}]",
                        view.shape()
                    ));
                }
                buffer_names.push(b.to_string());
            } else {
                return Err(format!("unexpected tensor {name:?}"));
            }
        }
        if buffer_names.len() > MAX_BUFFERS {
            return Err(format!(
                "{} optimizer buffers exceed the bound of {MAX_BUFFERS}",
                buffer_names.len()
            ));
        }
        let f32s = |name: &str| -> Result<Vec<f32>, String> {
            let view = st
                .tensor(name)
                .map_err(|_| format!("tensor {name:?} is missing"))?;
            Ok(sparktorch_proto::payload::decode_f32s(view.data()))
        };
        let mut params = Vec::with_capacity(n);
        for (name, _) in &layout {
            params.extend(f32s(&format!("{PARAM_PREFIX}{name}"))?);
        }
        buffer_names.sort();
        let mut buffers = Vec::with_capacity(buffer_names.len());
        for b in buffer_names {
            let values = f32s(&format!("{OPTIM_PREFIX}{b}"))?;
            buffers.push((b, values));
        }
        Ok(Self {
            engine_version,
            mode,
            version,
            optimizer,
            hyperparameters,
            optimizer_state: OptimizerState {
                step,
                scalars,
                buffers,
            },
            workers,
            num_workers,
            layout,
            model_buffers,
            early_stop,
            created_unix,
            params: Arc::new(params),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::tests::sample;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn roundtrip_is_bit_for_bit_and_leaves_no_temp_file() -> Result<(), CheckpointError> {
        let dir = std::env::temp_dir().join(format!("spt-ckpt-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| CheckpointError::Io {
            path: dir.clone(),
            op: "mkdir",
            source: e,
        })?;
        let c = sample();
        let file = dir.join(CHECKPOINT_FILE);
        c.write(&file)?;
        c.write(&file)?; // overwrite in place
        let entries: Vec<_> = std::fs::read_dir(&dir)
            .map(|r| r.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert_eq!(entries, vec![std::ffi::OsString::from(CHECKPOINT_FILE)]);
        let back = Checkpoint::read(&dir)?;
        assert_eq!(bits(&back.params), bits(&c.params));
        for ((n1, b1), (n2, b2)) in back
            .optimizer_state
            .buffers
            .iter()
            .zip(&c.optimizer_state.buffers)
        {
            assert_eq!(n1, n2);
            assert_eq!(bits(b1), bits(b2));
        }
        let mut sorted = c.hyperparameters.clone();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut got = back.hyperparameters.clone();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, sorted);
        assert_eq!(
            Checkpoint {
                hyperparameters: c.hyperparameters.clone(),
                ..back
            },
            c
        );
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn model_buffers_round_trip_and_shorten_the_optimizer_buffers() -> Result<(), String> {
        let mut c = sample();
        // 5 trainable elements as before, plus a BatchNorm-like buffer pair at the tail.
        c.layout.push(("bn.running_mean".into(), vec![2]));
        c.layout.push(("bn.num_batches_tracked".into(), vec![]));
        c.model_buffers = 3;
        c.params = Arc::new(vec![
            1.0,
            -0.0,
            f32::EPSILON,
            -3.5e-12,
            9.0,
            0.5,
            -0.5,
            12.0,
        ]);
        let dir = std::env::temp_dir().join(format!("spt-ckpt-buf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let file = dir.join("c.safetensors");
        c.write(&file).map_err(|e| e.to_string())?;
        let back = Checkpoint::read(&file).map_err(|e| e.to_string())?;
        assert_eq!(back.model_buffers, 3);
        assert_eq!(back.params, c.params);
        // Optimizer buffers as long as all the values (no room for the model buffers) are refused.
        c.optimizer_state.buffers[0].1 = vec![0.0; 8];
        c.write(&file).map_err(|e| e.to_string())?;
        let err = Checkpoint::read(&file)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("expected [5]"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn a_failed_write_leaves_no_temp_file_and_keeps_the_old_one() {
        let dir = std::env::temp_dir().join(format!("spt-ckpt-fail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let target = dir.join("taken");
        // A non-empty directory where the file should go: the rename must fail.
        assert!(std::fs::create_dir_all(target.join("inside")).is_ok());
        let err = sample().write(&target);
        assert!(matches!(err, Err(CheckpointError::Io { .. })), "{err:?}");
        let entries: Vec<_> = std::fs::read_dir(&dir)
            .map(|r| r.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert_eq!(entries, vec![std::ffi::OsString::from("taken")]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn encode(c: &Checkpoint) -> Vec<u8> {
        let dir = std::env::temp_dir().join(format!(
            "spt-ckpt-enc-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join("c.safetensors");
        assert!(c.write(&file).is_ok());
        let bytes = std::fs::read(&file).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        bytes
    }

    #[test]
    fn truncated_and_corrupted_files_are_errors_not_panics() {
        let good = encode(&sample());
        assert!(Checkpoint::from_bytes(&good).is_ok());
        for cut in 0..good.len() {
            assert!(
                Checkpoint::from_bytes(&good[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        // Flip every byte of the header and a sample of the data: never a panic.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0xA5;
            let _ = Checkpoint::from_bytes(&bad);
        }
        // A header claiming an enormous length.
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Checkpoint::from_bytes(&huge).is_err());
    }

    #[test]
    fn hostile_fields_are_named_in_the_error() {
        let mut c = sample();
        c.layout = vec![("x".into(), vec![usize::MAX, 2])];
        // Cannot even be written: the layout does not match the parameters.
        assert!(c.write(Path::new("/nonexistent/x")).is_err());
        // A wrong format version and a foreign file.
        let good = encode(&sample());
        let patch = |from: &str, to: &str| {
            let (from, to) = (from.as_bytes(), to.as_bytes());
            let mut out = good.clone();
            if let Some(i) = good.windows(from.len()).position(|w| w == from) {
                out[i..i + to.len()].copy_from_slice(to);
            }
            out
        };
        let err = Checkpoint::from_bytes(&patch(
            "\"format_version\":\"1\"",
            "\"format_version\":\"9\"",
        ));
        assert!(
            matches!(&err, Err(e) if e.contains("format version 9")),
            "{err:?}"
        );
        let err = Checkpoint::from_bytes(&patch(FORMAT_NAME, "sparktorch-checkpoinX"));
        assert!(
            matches!(&err, Err(e) if e.contains("not a sparktorch checkpoint")),
            "{err:?}"
        );
        let err = Checkpoint::from_bytes(&patch("\"dtype\":\"F32\"", "\"dtype\":\"I32\""));
        assert!(
            matches!(&err, Err(e) if e.contains("expected F32")),
            "{err:?}"
        );
        let file = std::env::temp_dir().join("spt-definitely-missing.safetensors");
        let err = Checkpoint::read(&file);
        assert!(
            matches!(&err, Err(e) if e.to_string().contains("spt-definitely-missing")),
            "{err:?}"
        );
    }
}
