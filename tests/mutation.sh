#!/usr/bin/env bash
# Mutation testing of distprop's core with mutmut: does the suite fail when the code
# is subtly wrong? Each mutant (one small change: an operator, a constant, a
# condition, a dropped call) is run against the tests that execute the changed
# function; a mutant no test fails on "survived".
#
#   bash tests/mutation.sh [GROUP...]      GROUP: autograd functional optim parallel data
#                                          (default: all five, one after the other)
#
# Each run mutates one part of the core against the tests written for it (the
# functional ops one module at a time, each against its own test files), in a fresh
# copy of this working tree under $MUTATION_DIR (default /tmp/distprop-mutation),
# at most $MUTATION_JOBS mutants at a time (default 2); the MPI tests run on 2 ranks
# as part of it (tests/mutation_mpi.py). tests/mutation_report.py then prints the
# score of every file and each surviving mutant that tests/mutation_equivalents.txt
# does not list as equivalent (RUN/report.txt), and at the end one table for all
# runs (summary.txt). MUTATION_SAMPLE=10 (or 5, 2) tries only the mutants numbered
# 10, 20, 30 ... (5, 10 ...; 2, 4 ...) in each function: a systematic sample for
# groups whose full run does not fit one sitting (parallel: every mutant that
# survives the single-process tests runs the MPI tests). MUTATION_SAMPLE_DIGIT=d
# (default 0) takes another sample of the same size: the numbers equal to d modulo
# MUTATION_SAMPLE (MUTATION_SAMPLE=10 MUTATION_SAMPLE_DIGIT=5: 5, 15, 25 ...; with
# MUTATION_SAMPLE=5, d is 0 to 4; with 2, 0 or 1). Needs mutmut 3.8 and pytest-timeout
# (pip install -e ".[test,mutation]").
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
workroot="${MUTATION_DIR:-/tmp/distprop-mutation}"
jobs="${MUTATION_JOBS:-2}"
every="${MUTATION_SAMPLE:-1}" digit="${MUTATION_SAMPLE_DIGIT:-0}"
case "$every" in 1|2|5|10) ;;
  *) echo "mutation.sh: MUTATION_SAMPLE is 1, 2, 5 or 10, not '$every'" >&2; exit 2 ;;
esac
case "$digit" in [0-9]) ;; *) digit=10 ;; esac
if [ "$digit" -ge "$every" ] && [ "$every" != 1 ]; then
  echo "mutation.sh: MUTATION_SAMPLE_DIGIT is 0 to $((every - 1)) for MUTATION_SAMPLE=$every, not '${MUTATION_SAMPLE_DIGIT}'" >&2
  exit 2
fi
case "$every" in  # the last digits of the mutant numbers tried: those equal to the digit modulo $every
  1) sample="" ;;
  2) sample="[$(seq -s '' "$digit" 2 9)]" ;;
  5) sample="[$digit$((digit + 5))]" ;;
  10) sample="$digit" ;;
esac

if [ "$(id -u)" = 0 ]; then  # Open MPI refuses to start as root without these
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
python -c "import mutmut, pytest_timeout" 2>/dev/null || {
  echo "mutation.sh: install mutmut and pytest-timeout: pip install -e '.[test,mutation]'" >&2; exit 2; }

# group -> what to mutate (globs, or mutant names for part of a file) and the tests to run
configure() {
  mutate=() skip=() names=() tests=()
  case "$1" in
    autograd)
      mutate=(distprop/autograd.py)
      tests=(tests/test_autograd.py tests/test_functional_{arithmetic,reductions,shapes,elementwise,activations}.py
             tests/test_nn_module.py) ;;
    functional/*)
      local module="${1#functional/}"
      mutate=("distprop/functional/$module.py")
      case "$module" in  # the op tests of the module, and the layer tests built on it
        arithmetic|linear) tests=("tests/test_functional_$module.py" tests/test_functional_shape_errors.py) ;;
        broadcast) tests=(tests/test_functional_arithmetic.py tests/test_functional_reductions.py) ;;
        attention) tests=(tests/test_functional_attention.py tests/test_nn_transformer.py) ;;
        channels) tests=(tests/test_functional_{channels,normalization,conv}.py) ;;
        conv|embedding) tests=("tests/test_functional_$module.py" tests/test_nn_layers.py) ;;
        normalization) tests=(tests/test_functional_normalization.py tests/test_nn_normalization.py) ;;
        special) tests=(tests/test_functional_activations.py) ;;
        *) tests=("tests/test_functional_$module.py") ;;
      esac ;;
    optim)
      mutate=("distprop/optim/*")
      tests=(tests/test_optim_*.py) ;;
    parallel)
      mutate=(distprop/parallel/communicator.py distprop/parallel/data_parallel.py distprop/parallel/reducer.py
              distprop/parallel/sync_batchnorm.py distprop/parallel/shm.py "distprop/parallel/transports/*")
      skip=("*nccl*")  # needs a GPU
      # test_scaling_transports.py: the transports' scheduling, the shared-memory one's modes, node barriers
      tests=(tests/test_parallel_*.py tests/test_scaling_transports.py tests/mutation_mpi.py) ;;
    data)
      # the sampler, and the loader's resume state (the rest of the loader is I/O)
      mutate=(distprop/data/sampler.py distprop/data/loader.py)
      names=("distprop.data.sampler.*"
             "distprop.data.loader.xǁArrowLoaderǁset_epoch__mutmut_*"
             "distprop.data.loader.xǁArrowLoaderǁstate_dict__mutmut_*"
             "distprop.data.loader.xǁArrowLoaderǁload_state_dict__mutmut_*"
             "distprop.data.loader.xǁArrowLoaderǁcheck_consistent__mutmut_*"
             "distprop.data.loader.xǁArrowLoaderǁ_consistency_record__mutmut_*"
             "distprop.data.loader.xǁArrowLoaderǁ__iter____mutmut_*"
             "distprop.data.loader.xǁArrowLoaderǁ_advance__mutmut_*"
             "distprop.data.loader.xǁ_LoaderIteratorǁ*")
      # the worker-process and token paths of __iter__ and load_state_dict have their own files
      tests=(tests/test_data_sampler.py tests/test_data_loader.py tests/test_data_workers.py tests/test_data_tokens.py
             tests/test_data_resume_tokens.py tests/mutation_mpi.py) ;;
    *) echo "mutation.sh: unknown group '$1' (autograd functional optim parallel data, or functional/MODULE)" >&2
       exit 2 ;;
  esac
}

run_group() {
  local group="$1" dir="$workroot/$1"
  configure "$group"
  rm -rf "$dir" && mkdir -p "$dir"
  # the working tree as it is (tracked and new files), without build outputs
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$dir" 2>/dev/null) || true
  cd "$dir"
  shopt -s nullglob
  {
    echo "[mutmut]"
    echo "source_paths = distprop"
    echo "only_mutate ="; for m in "${mutate[@]}"; do echo "    $m"; done
    if [ ${#skip[@]} -gt 0 ]; then echo "do_not_mutate ="; printf '    %s\n' "${skip[@]}"; fi
    echo "pytest_add_cli_args_test_selection ="; for t in "${tests[@]}"; do [ -e "$t" ] && echo "    $t"; done
    # Each mutant runs in a process forked from one that only collected the tests: forked
    # after tests ran, children inherit OpenMP/BLAS thread pools (torch's) that deadlock.
    echo "process_isolation = forkserver"
    # A test still running after 60 s fails (a mutant that loops forever is caught there, not
    # after mutmut's own limit: 15 times the estimated time of all its tests).
    echo "pytest_add_cli_args ="
    printf '    %s\n' -p no:cacheprovider -p no:random_order --hypothesis-profile=mutation --timeout=60
  } > setup.cfg
  shopt -u nullglob
  if [ -n "$sample" ]; then  # mutant names end in __mutmut_NUMBER
    if [ ${#names[@]} -eq 0 ]; then names=("*"); fi
    names=("${names[@]/%/$sample}")
    echo "1 in $every mutants, numbered *$sample" > sample
  fi
  echo "== mutation: $group ($(date -u +%FT%TZ), $jobs at a time${sample:+, mutants numbered *$sample}, in $dir)"
  local start=$SECONDS
  # The package under test is the mutated copy, also for subprocesses and MPI ranks.
  # (The folder must exist before Python starts, or it is never searched.)
  mkdir -p mutants
  # mutmut's recording of which tests call which function (its first step, in a
  # process of its own) fails now and then where the tests start threads (the loader's):
  # a segfault in the contextvars its call recording sets, or a test run that ends in
  # status 1 where the next try passes. Run it again then: it keeps the mutants and any
  # results it has. (The clean run of the tests that follows still has to pass.)
  local attempt
  for attempt in 1 2 3 4 5; do
    local status=0
    PYTHONPATH="$dir/mutants" DISTPROP_WATCHDOG_TIMEOUT=30 \
      mutmut run --max-children "$jobs" "${names[@]}" > attempt.log 2>&1 || status=$?
    cat attempt.log >> mutmut.log
    [ "$status" = 0 ] && break
    if [ "$attempt" = 5 ] || ! grep -Eq "failed to collect stats|Child exited with code -11" attempt.log; then
      tail -c 3000 attempt.log; exit 1
    fi
    echo "mutation.sh: mutmut's first step failed (attempt $attempt); running it again" | tee -a mutmut.log
  done
  echo "$(( (SECONDS - start + 59) / 60 ))" > minutes
  python "$repo/tests/mutation_report.py" --equivalents "$repo/tests/mutation_equivalents.txt" . | tee report.txt
  cd "$repo"
}

groups=()
for group in "${@:-autograd functional optim parallel data}"; do
  for name in $group; do
    if [ "$name" = functional ]; then  # one run per module
      for module in "$repo"/distprop/functional/*.py; do
        module="$(basename "$module" .py)"
        [ "$module" = __init__ ] || groups+=("functional/$module")
      done
    else
      groups+=("$name")
    fi
  done
done
for group in "${groups[@]}"; do run_group "$group"; done
dirs=(); for group in "${groups[@]}"; do dirs+=("$workroot/$group"); done
python "$repo/tests/mutation_report.py" --equivalents "$repo/tests/mutation_equivalents.txt" --summary "${dirs[@]}" \
  | tee "$workroot/summary.txt"
