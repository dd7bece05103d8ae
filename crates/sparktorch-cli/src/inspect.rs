//! `sparktorch-ps inspect`: a checkpoint's contents.

use std::path::Path;

use anyhow::Result;
use sparktorch_ps::checkpoint::{self, Checkpoint};

use crate::num;

/// Per-tensor statistics: min, max, mean, L2 norm (f64 accumulation), NaN/inf count.
struct TensorStats {
    name: String,
    shape: Vec<usize>,
    numel: usize,
    min: f64,
    max: f64,
    mean: f64,
    l2: f64,
    non_finite: usize,
}

fn tensor_stats(name: String, shape: Vec<usize>, v: &[f32]) -> TensorStats {
    let (mut min, mut max, mut sum, mut sq, mut bad) =
        (f64::INFINITY, f64::NEG_INFINITY, 0.0, 0.0, 0);
    for &x in v {
        let x = f64::from(x);
        if !x.is_finite() {
            bad += 1;
            continue;
        }
        min = min.min(x);
        max = max.max(x);
        sum += x;
        sq += x * x;
    }
    let finite = v.len() - bad;
    let (min, max) = if finite == 0 {
        (f64::NAN, f64::NAN)
    } else {
        (min, max)
    };
    TensorStats {
        name,
        shape,
        numel: v.len(),
        min,
        max,
        mean: if finite == 0 {
            f64::NAN
        } else {
            sum / finite as f64
        },
        l2: sq.sqrt(),
        non_finite: bad,
    }
}

/// Print what the checkpoint at `path` holds (as JSON with `json`): its [`Checkpoint::summary`]
/// and per-tensor statistics.
pub fn run(path: &Path, json: bool) -> Result<()> {
    let file = checkpoint::resolve(path);
    let c = Checkpoint::read(&file)?;
    let s = c.summary(&file);
    let params: Vec<TensorStats> = c
        .param_tensors()
        .map(|(name, shape, v)| tensor_stats(name.to_string(), shape.to_vec(), v))
        .collect();
    let buffers: Vec<TensorStats> = c
        .optimizer_state
        .buffers
        .iter()
        .map(|(name, b)| tensor_stats(name.clone(), vec![b.len()], b))
        .collect();
    let stats_json = |t: &TensorStats| {
        serde_json::json!({
            "name": t.name, "shape": t.shape, "numel": t.numel, "min": num(t.min),
            "max": num(t.max), "mean": num(t.mean), "l2": num(t.l2), "non_finite": t.non_finite,
        })
    };
    if json {
        let mut out = serde_json::to_value(&s)?;
        if let serde_json::Value::Object(m) = &mut out {
            m.insert("params".into(), params.iter().map(stats_json).collect());
            m.insert(
                "optimizer_buffers".into(),
                buffers.iter().map(stats_json).collect(),
            );
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("checkpoint      {}", s.path);
    println!(
        "format          {} v{} (engine {}), created {}",
        s.format, s.format_version, s.engine_version, s.created
    );
    println!("mode            {}", s.mode);
    println!("version         {} optimizer steps", s.version);
    println!(
        "parameters      {} in {} tensors ({} of them model buffers)",
        s.num_params,
        c.layout.len(),
        s.model_buffers
    );
    println!(
        "optimizer       {} {}",
        s.optimizer,
        checkpoint::hyper_json(s.hyperparameters)
    );
    let scalars: Vec<String> = s
        .optimizer_scalars
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "optimizer state step={}{}{}",
        s.optimizer_step,
        if scalars.is_empty() { "" } else { " " },
        scalars.join(" ")
    );
    println!(
        "early stop      best_loss={} bad_evaluations={} should_stop={}",
        s.early_stop
            .best_loss
            .map_or("none".to_string(), |b| b.to_string()),
        s.early_stop.bad_evaluations,
        s.early_stop.should_stop
    );
    println!("workers         {} (num_workers)", s.num_workers);
    println!("  {:>6} {:>12} {:>8}", "worker", "next_step", "attempt");
    for (w, st) in s.workers {
        println!("  {w:>6} {:>12} {:>8}", st.next_step, st.attempt);
    }
    let table = |title: &str, rows: &[TensorStats]| {
        println!("{title}");
        let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
        println!(
            "  {:<width$} {:>14} {:>13} {:>13} {:>13} {:>13}",
            "name", "shape", "min", "max", "mean", "l2"
        );
        for r in rows {
            let shape = format!("{:?}", r.shape);
            println!(
                "  {:<width$} {:>14} {:>13.6e} {:>13.6e} {:>13.6e} {:>13.6e}{}",
                r.name,
                shape,
                r.min,
                r.max,
                r.mean,
                r.l2,
                if r.non_finite > 0 {
                    format!("  ({} non-finite)", r.non_finite)
                } else {
                    String::new()
                }
            );
        }
    };
    table("parameters", &params);
    if buffers.is_empty() {
        println!("optimizer buffers: none");
    } else {
        table("optimizer buffers", &buffers);
    }
    Ok(())
}
