# Every trained run lives in results/<ds>/train/<run>/seed<N>/, <run> being its name in the
# grid (byol-baseline, simclr-probabilistic-ae-cosine, byol-weighted-vae-cosine-r2,
# byol-topk-queue, nnclr-baseline; see pipeline.train.grid), and the untrained control in
# train/untrained/. state.pt beside the outputs is the resumable checkpoint: a killed job
# re-run by snakemake continues from it. It is a param, not an output, so Snakemake never
# deletes it; after training it holds the finished encoder, so a job whose outputs Snakemake
# discarded as incomplete (Ctrl-C, kill -9) only rewrites them.


rule train:
    """One run of the grid: a method, a neighbour use and a source, looked up by name. One
    job per seed, or per run with train.seeds_in_one_job (its seeds one after another)."""
    input:
        data=f"{R}/prepared",
        checked=ancient(CHECKED),
        neighbours=train_neighbours,
        code=code_of("train"),
    output:
        encoder=train_files("encoder.pt"),
        history=train_files("history.csv"),
        loss_plot=[
            report(p, caption="../report/train_loss.rst", category="Training", subcategory="{run}")
            for p in train_files("loss.png")
        ],
    wildcard_constraints:
        run="|".join(RUNS) or "no-runs",
    params:
        cfg=train_cfg,
        opts=runtime_of("train"),
        run=train_args,
        device=DEVICE,
        seeds=train_seeds,
        state=train_state,
        launch=train_launch,
    log:
        f"{LOGS}/train/{TRAIN_JOB}.log",
    benchmark:
        f"{R}/benchmarks/train/{TRAIN_JOB}.tsv"
    conda:
        ENV
    threads: TRAIN_THREADS
    resources:
        mem_mb=memory("train", PROCESSES),
        runtime=minutes("train", GPU, TASKS),
        gpu=TRAIN_GPUS,
        **site(GPU),
        **train_tasks(),
    shell:
        "{params.launch} python -m pipeline --threads {threads} train {params.run}"
        " --seed {params.seeds} --params {params.cfg:q} --runtime {params.opts:q}"
        " --device {params.device} --data {input.data} --out {output.encoder}"
        " --state {params.state} --history {output.history} --loss-plot {output.loss_plot}"
        " > {log} 2>&1"


rule untrained:
    """The randomly initialised encoder: the control that shows what training added."""
    input:
        data=f"{R}/prepared",
        checked=ancient(CHECKED),
        code=code_of("untrained"),
    output:
        encoder=f"{R}/train/untrained/seed{{seed}}/encoder.pt",
    params:
        backbone=config["train"]["backbone"],
    log:
        f"{LOGS}/train/untrained-seed{{seed}}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "python -m pipeline --threads {threads} untrained --seed {wildcards.seed}"
        " --backbone {params.backbone} --data {input.data} --out {output.encoder} > {log} 2>&1"


rule embed:
    """An encoder's features of every image, in the latents.parquet schema (opt-in target:
    results/<tag>/train/<run>/seed<N>/features.parquet)."""
    input:
        encoder=f"{R}/train/{{name}}/seed{{seed}}/encoder.pt",
        data=f"{R}/prepared",
        code=code_of("embed"),
    output:
        f"{R}/train/{{name}}/seed{{seed}}/features.parquet",
    wildcard_constraints:
        name=r"[a-z0-9-]+",
    params:
        dataset=DS,
        device=DEVICE,
    log:
        f"{LOGS}/embed/{{name}}-seed{{seed}}.log",
    conda:
        ENV
    threads: heavy_threads(GPU)
    resources:
        mem_mb=memory("embed"),
        runtime=minutes("embed", GPU),
        gpu=GPU,
        **site(GPU),
    shell:
        "python -m pipeline --threads {threads} embed --run {wildcards.name}"
        " --dataset {params.dataset} --device {params.device} --encoder {input.encoder}"
        " --data {input.data} --out {output} > {log} 2>&1"
