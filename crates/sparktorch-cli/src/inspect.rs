//! `sparktorch-ps inspect`: a checkpoint's contents.

use std::path::Path;

use anyhow::Result;
use sparktorch_ps::checkpoint::{self, Checkpoint};
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

/// A float for JSON output: non-finite values become null.
fn num(v: f64) -> serde_json::Value {
    if v.is_finite() {
        serde_json::json!(v)
    } else {
        serde_json::Value::Null
    }
}

/// Print what the checkpoint at `path` holds (as JSON with `json`).
pub fn run(path: &Path, json: bool) -> Result<()> {
    let file = checkpoint::resolve(path);
    let c = Checkpoint::read(&file)?;
    let mut params = Vec::new();
    let mut offset = 0;
    for (name, shape) in &c.layout {
        let n: usize = shape.iter().product();
        params.push(tensor_stats(
            name.clone(),
            shape.clone(),
            &c.params[offset..offset + n],
        ));
        offset += n;
    }
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
        let hyper = checkpoint::hyper_json(&c.hyperparameters);
        let workers: serde_json::Map<String, serde_json::Value> = c
            .workers
            .iter()
            .map(|(w, s)| {
                (
                    w.to_string(),
                    serde_json::json!({"next_step": s.next_step, "attempt": s.attempt}),
                )
            })
            .collect();
        let scalars: serde_json::Map<String, serde_json::Value> = c
            .optimizer_state
            .scalars
            .iter()
            .map(|(k, v)| (k.clone(), num(*v)))
            .collect();
        let out = serde_json::json!({
            "path": file.display().to_string(),
            "format": checkpoint::FORMAT_NAME,
            "format_version": checkpoint::FORMAT_VERSION,
            "engine_version": c.engine_version,
            "created": checkpoint::iso8601(c.created_unix),
            "created_unix": c.created_unix,
            "mode": c.mode.as_str(),
            "version": c.version,
            "num_workers": c.num_workers,
            "num_params": c.params.len(),
            "model_buffers": c.model_buffers,
            "optimizer": c.optimizer,
            "hyperparameters": hyper,
            "optimizer_step": c.optimizer_state.step,
            "optimizer_scalars": scalars,
            "early_stop": {
                "best_loss": c.early_stop.best_loss.map(num),
                "bad_evaluations": c.early_stop.bad_evaluations,
                "should_stop": c.early_stop.should_stop,
            },
            "workers": workers,
            "params": params.iter().map(stats_json).collect::<Vec<_>>(),
            "optimizer_buffers": buffers.iter().map(stats_json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("checkpoint      {}", file.display());
    println!(
        "format          {} v{} (engine {}), created {}",
        checkpoint::FORMAT_NAME,
        checkpoint::FORMAT_VERSION,
        c.engine_version,
        checkpoint::iso8601(c.created_unix)
    );
    println!("mode            {}", c.mode);
    println!("version         {} optimizer steps", c.version);
    println!(
        "parameters      {} in {} tensors ({} of them model buffers)",
        c.params.len(),
        c.layout.len(),
        c.model_buffers
    );
    println!(
        "optimizer       {} {}",
        c.optimizer,
        checkpoint::hyper_json(&c.hyperparameters)
    );
    let scalars: Vec<String> = c
        .optimizer_state
        .scalars
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "optimizer state step={}{}{}",
        c.optimizer_state.step,
        if scalars.is_empty() { "" } else { " " },
        scalars.join(" ")
    );
    println!(
        "early stop      best_loss={} bad_evaluations={} should_stop={}",
        c.early_stop
            .best_loss
            .map_or("none".to_string(), |b| b.to_string()),
        c.early_stop.bad_evaluations,
        c.early_stop.should_stop
    );
    println!("workers         {} (num_workers)", c.num_workers);
    println!("  {:>6} {:>12} {:>8}", "worker", "next_step", "attempt");
    for (w, s) in &c.workers {
        println!("  {w:>6} {:>12} {:>8}", s.next_step, s.attempt);
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
