# ---- job step: signals and requeue (slurm/_job_body.sh, shared by every template) ----
# Runs `$PYTHON -m hpcjobs "${STEP[@]}"` as one srun step (or one mpirun).  USR1 (Slurm's warning before
# the time limit) or TERM reaching this shell is passed on to the step, whose tasks stop
# with a checkpoint and exit with 75; the job then requeues itself (up to MAX_REQUEUES),
# or with ON_STOP=next-slot leaves the rest to the next job of its chain, or with ON_STOP=renew
# submits that next job itself.  `hpcjobs cancel` writes RUN_DIR/CANCELLED: then the job
# neither starts the step, nor requeues, nor renews.
if [ -e "$RUN_DIR/CANCELLED" ]; then
    echo "$RUN_DIR was cancelled (hpcjobs cancel); nothing to do (hpcjobs train or submit on it clears the cancel)"
    exit 0
fi
export HPCJOBS_JOB_SCRIPT=1  # hpcjobs train in this job leaves a cancel in place
step_pid=""
pending=""
resend_pid=""
forward() {  # pass a signal on to the step (srun, or mpirun, forwards it to every task)
    local sig=$1
    # mpirun would kill its ranks on TERM; on USR1 (which it forwards) they stop with a checkpoint
    [ "${LAUNCH[0]}" = mpirun ] && sig=USR1
    echo "batch shell got SIG$1 at $(date +%T); passing SIG$sig to the step ($WHAT)"
    if [ -z "$step_pid" ]; then pending=$1; return; fi
    kill -s "$sig" "$step_pid" 2>/dev/null
    # a task still starting up ignores USR1 (see below): say it once more a little later
    if [ "$sig" = USR1 ]; then
        (sleep 20; kill -s USR1 "$step_pid") >/dev/null 2>&1 &
        resend_pid=$!
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

launch=("${LAUNCH[@]}")
if [ "${LAUNCH[0]}" = srun ]; then  # srun no longer takes --cpus-per-task from sbatch by itself
    launch+=(${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"})
elif [ "$(id -u)" -eq 0 ]; then  # mpirun: Open MPI reads the allocation, one rank per task
    launch+=(--allow-run-as-root)
fi
# Each task ignores USR1 until hpcjobs installs its handler (an ignored signal stays
# ignored across exec; Python's default for USR1 would be to die without a checkpoint).
"${launch[@]}" bash -c 'trap "" USR1; exec "$@"' hpcjobs-task \
    "$PYTHON" -m hpcjobs "${STEP[@]}" &
step_pid=$!
[ -n "$pending" ] && forward "$pending"
# `wait` returns early when a trapped signal arrives: keep waiting until the step has ended
while :; do
    wait "$step_pid"
    rc=$?
    kill -0 "$step_pid" 2>/dev/null || break
done
[ -n "$resend_pid" ] && kill "$resend_pid" 2>/dev/null
echo "$WHAT exited with $rc at $(date +%T)"

if [ "$rc" -eq 75 ] && [ -e "$RUN_DIR/CANCELLED" ]; then
    echo "stopped with a checkpoint; $RUN_DIR was cancelled (hpcjobs cancel): not requeued, no next slot"
    exit 0
fi
if [ "${ON_STOP:-requeue}" = renew ] && [ "$rc" -ne 0 ] && [ "$rc" -ne 75 ]; then
    echo "this slot failed (exit $rc): the chain ends here, no next slot is submitted"
    "$PYTHON" -m hpcjobs.slurm.chain failed "$RUN_DIR" "${SLURM_JOB_ID:-?}" "$rc"
fi
if [ "$rc" -eq 75 ]; then  # stopped cleanly with a checkpoint, more to do
    if [ "${ON_STOP:-requeue}" = renew ]; then
        if "$PYTHON" -m hpcjobs.slurm.chain renew "$RUN_DIR" "${SLURM_JOB_ID:-?}"; then
            exit 0
        fi
        echo "the next slot could not be submitted: submit again to continue from the checkpoint"
        exit 75
    fi
    if [ "${ON_STOP:-requeue}" = next-slot ]; then
        echo "stopped with a checkpoint; the next job of the chain continues"
        exit 0
    fi
    if [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then
        if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
            job=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
        else
            job=$SLURM_JOB_ID
        fi
        echo "requeueing job $job (requeue $(( ${SLURM_RESTART_COUNT:-0} + 1 )) of $MAX_REQUEUES)"
        if scontrol requeue "$job"; then
            exit 0  # the requeue is not a failure
        fi
        echo "scontrol requeue $job failed"
    else
        echo "not requeued: $MAX_REQUEUES requeues used; submit again to continue from the checkpoint"
    fi
fi
exit "$rc"
