"""The README's two commands are what users and CI run: keep them in step with .ci/run and the configs."""

import re
from pathlib import Path


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", Path("README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    run_job, run_tests = readme_commands()
    assert "ditquant fit --config configs/" in run_job and "ditquant test --config configs/" in run_job
    assert run_tests in Path(".ci/run").read_text()


def test_readme_main_job_config_exists():
    run_job = readme_commands()[0]
    for config in re.findall(r"--config (\S+)", run_job):
        assert Path(config).is_file(), config
