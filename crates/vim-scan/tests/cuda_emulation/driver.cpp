// Driver for the emulated kernels: makes random inputs, runs the forward and backward kernels
// of scan.cu, and writes inputs and results as raw little-endian arrays for the Rust test.
// Usage: driver OUT_DIR f32|f64 batch E N L has_d has_z has_bias softplus seed

template <typename T> struct Run {
  static void write(const char *dir, const char *name, const std::vector<T> &v) {
    std::string path = std::string(dir) + "/" + name;
    FILE *f = std::fopen(path.c_str(), "wb");
    if (!f || std::fwrite(v.data(), sizeof(T), v.size(), f) != v.size()) std::exit(3);
    std::fclose(f);
  }

  static int go(const char *dir, int batch, int E, int N, int L, int has_d, int has_z,
                int has_bias, int sp, unsigned long long seed,
                void (*fwd)(const T *, const T *, const T *, T *, T *, int, int, int, int, int,
                            int, int, int),
                void (*bwd)(const T *, const T *, const T *, const T *, T *, int, int, int,
                            int, int, int, int, int)) {
    auto rnd = [&](double lo, double hi) {
      seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
      double r = double(seed >> 11) / double(1ULL << 53);
      return T(lo + (hi - lo) * r);
    };
    const long rows = (long)batch * E * L, bc = (long)batch * N * L;
    std::vector<T> x1;  // [u; delta; z?; dout]
    for (long i = 0; i < rows; ++i) x1.push_back(rnd(-1, 1));
    for (long i = 0; i < rows; ++i) x1.push_back(rnd(sp ? -3.0 : 0.0, sp ? 0.5 : 0.1));
    if (has_z)
      for (long i = 0; i < rows; ++i) x1.push_back(rnd(-2, 2));
    for (long i = 0; i < rows; ++i) x1.push_back(rnd(-1, 1));
    std::vector<T> x2;  // [A; D?; bias?]
    for (long i = 0; i < (long)E * N; ++i) x2.push_back(rnd(-2.0, -0.05));
    if (has_d)
      for (int i = 0; i < E; ++i) x2.push_back(rnd(-1, 1));
    if (has_bias)
      for (int i = 0; i < E; ++i) x2.push_back(rnd(-0.5, 0.5));
    std::vector<T> x3;  // [B; C]
    for (long i = 0; i < 2 * bc; ++i) x3.push_back(rnd(-1, 1));

    const int chunks = std::max(1, (L + CHUNK - 1) / CHUNK);
    const unsigned blocks = batch * E;
    std::vector<T> y(rows, T(-777)), states((long)blocks * chunks * N, T(-777));
    emu_launch(blocks, THREADS, N * sizeof(T), [&] {
      fwd(x1.data(), x2.data(), x3.data(), y.data(), states.data(), batch, E, N, L, has_d,
          has_z, has_bias, sp);
    });
    const long total = (has_z ? 3 : 2) * rows + (long)E * N + (has_d ? E : 0) +
                       (has_bias ? E : 0) + 2 * bc;
    std::vector<T> grads(total, T(0));
    emu_launch(blocks, THREADS, (2 * N + 2) * sizeof(T), [&] {
      bwd(x1.data(), x2.data(), x3.data(), states.data(), grads.data(), batch, E, N, L,
          has_d, has_z, has_bias, sp);
    });
    write(dir, "x1g.bin", x1);
    write(dir, "x2.bin", x2);
    write(dir, "x3.bin", x3);
    write(dir, "y.bin", y);
    write(dir, "grads.bin", grads);
    return 0;
  }
};

int main(int argc, char **argv) {
  if (argc != 12) {
    std::fprintf(stderr, "usage: driver OUT f32|f64 batch E N L d z bias softplus seed\n");
    return 2;
  }
  int v[8];
  for (int i = 0; i < 8; ++i) v[i] = std::atoi(argv[3 + i]);
  unsigned long long seed = std::strtoull(argv[11], nullptr, 10);
  if (std::string(argv[2]) == "f32")
    return Run<float>::go(argv[1], v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], seed,
                          vim_scan_fwd_f32, vim_scan_bwd_f32);
  return Run<double>::go(argv[1], v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], seed,
                         vim_scan_fwd_f64, vim_scan_bwd_f64);
}
