"""Prints the kernel benchmark table from a pytest-benchmark JSON file (the extra_info of each case)."""
import json
import sys


def main(path: str) -> None:
    runs = json.load(open(path))["benchmarks"]
    print(f"{'op':<26}{'case':<16}{'B':>4}{'us':>9}{'GB/s':>8}{'% floor':>9}{'torch us':>10}{'x torch':>8}"
          f"{'fp32 us':>10}")
    for run in runs:
        e = run["extra_info"]
        case = str(e.get("shape") or " ".join(f"{key} {e[key]}" if key == "step" else str(e[key])
                                              for key in ("filled", "kv_dtype", "step") if key in e))
        print(f"{e['op']:<26}{case:<16}{e.get('batch', ''):>4}{e['us']:>9.2f}{e['GBps']:>8.0f}"
              f"{e.get('pct_of_floor', float('nan')):>8.1f}%{e.get('torch_us', float('nan')):>10.2f}"
              f"{e.get('speedup_vs_torch', float('nan')):>8.2f}"
              f"{e.get('torch_strict_fp32_us', float('nan')):>10.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
