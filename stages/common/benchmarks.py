"""The evaluation tasks' names that two stages share: evaluate builds the local ones from held-out
documents (stages/evaluate/tasks.py) and runs the others from lm-eval; decontaminate reads the others'
texts and skips the local ones, which are held out of training already."""

PPL_TASK = "heldout_ppl"  # perplexity of held-out documents
MC_TASK = "heldout_mc"  # which continuation follows a held-out passage
LOCAL_TASKS = (PPL_TASK, MC_TASK)


def standard_tasks(tasks: tuple[str, ...]) -> tuple[str, ...]:
    """The configured tasks that lm-eval provides (every name but the local ones), in order."""
    return tuple(t for t in tasks if t not in LOCAL_TASKS)
