rule prepare:
    """Turn the configured data-set source into the canonical prepared file."""
    input:
        code=code_of("prepare"),
    output:
        directory(f"{R}/prepared"),
    params:
        cfg=params_of("prepare"),
    conda:
        ENV
    log:
        f"{LOGS}/prepare.log",
    threads: 2
    resources:
        mem_mb=fixed("prepare", "mem_mb", 8000),
        runtime=fixed("prepare", "runtime", 60),
        **site(0),
    shell:
        "python -m pipeline --threads {threads} prepare --params {params.cfg:q} --out {output} > {log} 2>&1"


# Training rules take this marker as ancient input: they wait for the checks, and a re-run
# of the checks (neighbours.k changed) never invalidates finished training.
CHECKED = f"{R}/data_checked.json"


rule check_data:
    """Checks that need the prepared data (neighbours.k, labels) before any training starts."""
    input:
        data=f"{R}/prepared",
        code=code_of("check-data"),
    output:
        CHECKED,
    params:
        k=f"--k {config['neighbours']['k']}" if SPACES and METRICS else "",
        queue=(
            f"--queue-size {config['train']['queue']['queue_size']}"
            if any(r.source == "queue" for r in RUNS.values())
            else ""
        ),
    log:
        f"{LOGS}/check_data.log",
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m pipeline check-data --data {input.data} {params.k} {params.queue} --out {output} > {log} 2>&1"
