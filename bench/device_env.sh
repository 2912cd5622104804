# Sourced by the prepared device scripts (bench/device_*.sh): install the carried wheels (.whl/) into /tmp/site,
# start the carried redis-server (.redis/) on 6379, export the service's offline settings, record the GPU in $OUT.
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
if [ -x .redis/redis-server ]; then
  LD_LIBRARY_PATH=$PWD/.redis .redis/redis-server --port 6379 --bind 127.0.0.1 --save "" --daemonize yes
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 RESIDUAL_REDIS_URL=redis://127.0.0.1:6379/0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
