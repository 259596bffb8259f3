rule evaluate_pixels:
    """Linear probe on standardised raw pixels: the floor every representation must beat."""
    input:
        data=f"{R}/prepared",
        checked=ancient(CHECKED),
        code=code_of("evaluate"),
    output:
        eval_json("pixels"),
    params:
        cfg=params_of("evaluate"),
        dataset=DS,
    conda:
        ENV
    log:
        f"{LOGS}/evaluate/pixels.log",
    threads: 2
    resources:
        mem_mb=memory("evaluate_pixels"),
        runtime=minutes("evaluate_pixels"),
        **site(0),
    shell:
        "python -m pipeline --threads {threads} evaluate --params {params.cfg:q} --run pixels"
        " --dataset {params.dataset} --source {input.data} --data {input.data} --out {output} > {log} 2>&1"


rule evaluate_latent:
    """Linear probe on a latent space itself, before training uses it."""
    input:
        source=f"{R}/latent/{{model}}/latents.parquet",
        data=f"{R}/prepared",
        checked=ancient(CHECKED),
        code=code_of("evaluate"),
    output:
        os.path.join(R, "eval", "latent-{model}.json"),
    params:
        cfg=params_of("evaluate"),
        dataset=DS,
    log:
        f"{LOGS}/evaluate/latent-{{model}}.log",
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "python -m pipeline --threads {threads} evaluate --params {params.cfg:q}"
        " --run latent-{wildcards.model} --dataset {params.dataset} --source {input.source}"
        " --data {input.data} --out {output} > {log} 2>&1"


rule evaluate_train:
    """A run's frozen trained (or untrained) encoders, one per seed, no projector, no
    augmentation: linear probe and kNN. One job per run: its seeds share the imports."""
    input:
        sources=train_encoders,
        data=f"{R}/prepared",
        code=code_of("evaluate"),
    output:
        [os.path.join(R, "eval", "{run}", f"seed{s}.json") for s in SEEDS],
    wildcard_constraints:
        run="|".join([*RUNS, "untrained"]),
    params:
        cfg=params_of("evaluate"),
        dataset=DS,
        device=DEVICE,
        seeds=" ".join(map(str, SEEDS)),
    log:
        f"{LOGS}/evaluate/{{run}}.log",
    conda:
        ENV
    threads: heavy_threads(GPU)
    resources:
        mem_mb=memory("evaluate_train"),
        runtime=minutes("evaluate_train", GPU),
        gpu=GPU,
        **site(GPU),
    shell:
        "python -m pipeline --threads {threads} evaluate --params {params.cfg:q}"
        " --run {wildcards.run} --seed {params.seeds} --dataset {params.dataset}"
        " --device {params.device} --source {input.sources} --data {input.data}"
        " --out {output} > {log} 2>&1"


from pipeline.experiments import write_config_rst

# The report's landing page shows the configuration of the experiment it reports: the tag
# used, the keys that differ from the schema defaults, the whole config collapsed. Written
# while `snakemake --report` reads this very config (never from another run's settings);
# workflow/report/workflow.rst includes it.
if workflow.is_main_process and report_path(sys.argv) is not None:
    write_config_rst(f"{R}/config.rst", config, DS)


rule aggregate:
    """The experiment's results table, its summary over seeds with paired differences to the
    baseline (CSV and HTML pages for the report), and the report's data-set overview."""
    input:
        runs=linear_eval_inputs,
        purity=purity_table,
        data=f"{R}/prepared",
        code=code_of("aggregate"),
    output:
        table=report(f"{R}/linear_eval.csv", caption="../report/linear_eval.rst",
                     category="Results", subcategory="Tables (CSV)",
                     labels={"table": "linear_eval.csv: every run and seed"}),
        summary=report(f"{R}/summary.csv", caption="../report/summary.rst",
                       category="Results", subcategory="Tables (CSV)",
                       labels={"table": "summary.csv: per configuration over seeds"}),
        summary_html=report(f"{R}/summary.html", caption="../report/summary.rst",
                            category="Results", subcategory="Summary and paired differences",
                            labels={"page": "1. summary table: mean ± std over seeds, "
                                    "paired difference to each baseline"}),
        table_html=report(f"{R}/linear_eval.html", caption="../report/linear_eval.rst",
                          category="Results", subcategory="Every run",
                          labels={"page": "results table: every run and seed"}),
        overview=f"{R}/overview.rst",
    conda:
        ENV
    params:
        purity=purity_flag,
    log:
        f"{LOGS}/aggregate.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m pipeline aggregate --out {output.table} --summary {output.summary}"
        " --summary-html {output.summary_html} --table-html {output.table_html}"
        " --overview {output.overview} --data {input.data} {params.purity} {input.runs}"
        " > {log} 2>&1"


rule figures:
    """Every figure of the report's results pages, from the tables, metrics and histories."""
    input:
        summary=f"{R}/summary.csv",
        data=f"{R}/prepared",
        evals=linear_eval_inputs,
        histories=train_histories,
        code=code_of("figures"),
    output:
        accuracy=report(f"{R}/accuracy.png", caption="../report/accuracy.rst",
                        category="Results", subcategory="Summary and paired differences",
                        labels={"page": "3. accuracy per representation (chart)"}),
        paired=report(f"{R}/paired_difference.png", caption="../report/paired_difference.rst",
                      category="Results", subcategory="Summary and paired differences",
                      labels={"page": "2. paired differences with 95 % intervals (chart)"}),
        purity=report(f"{R}/accuracy_vs_purity.png",
                      caption="../report/accuracy_vs_purity.rst", category="Results",
                      subcategory="Why: purity, classes, embeddings",
                      labels={"page": "1. accuracy versus neighbour purity"}),
        per_class=report(f"{R}/per_class.png", caption="../report/per_class.rst",
                         category="Results", subcategory="Why: purity, classes, embeddings",
                         labels={"page": "2. per-class accuracy against the baseline"}),
        embeddings=report(f"{R}/embeddings.png", caption="../report/embeddings.rst",
                          category="Results", subcategory="Why: purity, classes, embeddings",
                          labels={"page": "3. test images in 2-D (PCA), coloured by label"}),
        curves=report(f"{R}/train_histories.png", caption="../report/train_histories.rst",
                      category="Training", subcategory="all runs"),
    conda:
        ENV
    log:
        f"{LOGS}/figures.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    shell:
        "python -m pipeline figures --summary {input.summary} --data {input.data}"
        " --evals {input.evals} --histories {input.histories} --accuracy {output.accuracy}"
        " --paired {output.paired} --purity {output.purity} --per-class {output.per_class}"
        " --embeddings {output.embeddings} --curves {output.curves} > {log} 2>&1"


rule combine:
    """results/linear_eval.csv: this experiment's table beside every other experiment's
    results/<tag>/linear_eval.csv on disk. It needs every report file, so that
    `snakemake --report` works right after this target is built."""
    input:
        table=f"{R}/linear_eval.csv",
        report=report_inputs,
        code=code_of("combine"),
    output:
        "results/linear_eval.csv",
    conda:
        ENV
    log:
        f"{LOGS}/combine.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m pipeline combine --current {input.table} --out {output} > {log} 2>&1"
