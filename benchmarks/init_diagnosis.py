"""Where the default recipe's initialisation finds its clusters: the codes or the embedding.

Replays the ``vade-umap`` stage for one seed on the first 55k MNIST training images (UMAP, then
10 epochs of pretraining with the encoder pulled onto the embedding) and scores, on the last 5k
training images (the validation split; the test set is not read), the mixtures the stage could
write into the prior:

* a full-covariance GaussianMixture fitted afresh on the codes (10 k-means starts, best
  likelihood kept: the stage until commit 5627c44),
* the same fitted on the UMAP embedding, scored there,
* that mixture applied to the codes as it is,
* EM on the codes started from the embedding's partition (the stage since 5627c44),
* single k-means starts on the codes.

    python benchmarks/init_diagnosis.py --seed 3 --out benchmarks/results/init_diagnosis_seed3.json

About 8 CPU minutes, one thread.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pyro_gmvae.harness.data import load_dataset  # noqa: E402
from pyro_gmvae.harness.run import RECIPES, RunConfig, build_model, git_commit  # noqa: E402
from pyro_gmvae.init import encode_all, fit_mixture, pretrain_autoencoder, umap_embedding  # noqa: E402
from pyro_gmvae.metrics import cluster_acc_hungarian  # noqa: E402

VALIDATION = 5000


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--starts", type=int, default=5, help="single k-means starts on the codes")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.process_time()
    cfg = RunConfig(**{**RECIPES["vade-umap"], "seed": args.seed, "validation": VALIDATION})
    x_all = load_dataset("mnist", train=True, download=False)
    x, labels = x_all.x[:-VALIDATION], x_all.labels[:-VALIDATION].numpy()
    x_val, y_val = x_all.x[-VALIDATION:], x_all.labels[-VALIDATION:].numpy()
    pyro.set_rng_seed(cfg.seed)
    model, guide = build_model(cfg, x.shape[1], x_all.image_shape)
    torch.manual_seed(cfg.seed)
    embedding = umap_embedding(x.numpy(), model.z_dim, seed=cfg.seed)
    target = torch.as_tensor(embedding, dtype=x.dtype)
    pretrain_autoencoder(model, guide, x, cfg.pretrain_epochs, seed=cfg.seed, target=target,
                         target_weight=10.0)  # fmt: skip
    codes = encode_all(guide, x).double().numpy()
    val_codes = encode_all(guide, x_val).double().numpy()
    k, cov, var = model.k, model.covariance, model.min_var

    def scored(name, gmm, train_points, val_points):
        return {"mixture": name,
                "validation_acc": cluster_acc_hungarian(y_val, gmm.predict(val_points)),
                "train_acc": cluster_acc_hungarian(labels, gmm.predict(train_points)),
                "mean_log_likelihood": float(gmm.score(train_points))}  # fmt: skip

    fresh = fit_mixture(codes, k, cov, 10, cfg.seed, var)
    on_embedding = fit_mixture(embedding, k, cov, 10, cfg.seed, var)
    from_partition = fit_mixture(codes, k, cov, 10, cfg.seed, var,
                                 on_embedding.predict_proba(embedding))  # fmt: skip
    rows = [
        scored("fitted afresh on the codes (until 5627c44)", fresh, codes, val_codes),
        {
            **scored(
                "fitted on the embedding, applied to the codes", on_embedding, codes, val_codes
            ),
            "note": "the embedding's own mixture, copied",
        },  # fmt: skip
        scored(
            "EM on the codes from the embedding's partition (since 5627c44)",
            from_partition,
            codes,
            val_codes,
        ),  # fmt: skip
    ]
    # The embedding's clusters on the embedding itself (training images only: UMAP saw them).
    rows.append({"mixture": "fitted on the embedding, scored there (training images)",
                 "train_acc": cluster_acc_hungarian(labels, on_embedding.predict(embedding)),
                 "mean_log_likelihood": float(on_embedding.score(embedding))})  # fmt: skip
    for start in range(args.starts):
        single = fit_mixture(codes, k, cov, 1, start, var)
        rows.append(scored(f"one k-means start on the codes (random_state {start})", single,
                           codes, val_codes))  # fmt: skip
    mse = float(((codes - embedding) ** 2).mean())
    for r in rows:
        print(f"{r['mixture']:70s} val {r.get('validation_acc', float('nan')):.4f} "
              f"train {r['train_acc']:.4f} log-lik {r['mean_log_likelihood']:.4f}")  # fmt: skip
    print(f"codes vs embedding: mean squared error {mse:.4f} per standardised dimension")
    result = {"seed": args.seed, "commit": git_commit(), "config": dataclasses.asdict(cfg),
              "code_embedding_mse": mse, "rows": rows, "cpu_s": time.process_time() - t0,
              "command": "python benchmarks/init_diagnosis.py " + " ".join(sys.argv[1:])}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
