/*
 * elra_example.c — calling the elra C ABI (include/elra.h) from C.
 *
 * Build against the static library (after `cargo build --release`):
 *   cc -std=c11 -Wall -Wextra -Iinclude examples/c/elra_example.c target/release/libelra.a \
 *      -lpthread -ldl -lm -lrt -lutil -o elra_example
 * or the shared one:
 *   cc -std=c11 -Iinclude examples/c/elra_example.c -Ltarget/release -lelra -o elra_example
 *   LD_LIBRARY_PATH=target/release ./elra_example
 *
 * It evaluates phi1 and exp on a strided batch, the adjoint Frechet derivative of phi1 (the
 * gradient of <phi1(Z), G>), runs an ELRA adapter forward and backward, saves and reloads it,
 * checks everything against closed forms, shows the error protocol, and prints
 * "elra_example: all checks passed" on success (exit code 0; 1 on any failure).
 */
#define _POSIX_C_SOURCE 200809L /* mkdtemp */
#include "elra.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h> /* rmdir */

static int failures = 0;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "FAILED %s:%d: ", __FILE__, __LINE__);         \
            fprintf(stderr, __VA_ARGS__);                                  \
            fprintf(stderr, "\n");                                         \
            failures++;                                                    \
        }                                                                  \
    } while (0)

static void print_error(const char *what, ElraStatus s) {
    char msg[256];
    size_t full = elra_last_error_message(msg, sizeof msg);
    printf("%s -> status %d: %s%s\n", what, (int)s, msg, full >= sizeof msg ? " [truncated]" : "");
}

/* phi1(x) = (e^x - 1)/x for a scalar, with phi1(0) = 1. */
static double phi1_scalar(double x) { return x == 0.0 ? 1.0 : expm1(x) / x; }


/* An ELRA adapter whose generator is nilpotent, so that everything has a closed form:
 * d = 4, k = 3, r = 1, A = e0 (d x 1), B = e1^T (1 x d), eta = 0.5, no clip, no schedule effects.
 * Then G = eta * A B = 0.5 e0 e1^T, Z = B A = 0, G^2 = 0 and exp(G) = I + G exactly:
 * W_new = W0 except row 0, which becomes W0[0,:] + 0.5 * W0[1,:].
 * For L = <Y, dY> (lambda = 0): dX = dY W_new, dL/deta = sum_n dY[n,0] * (X[n,:] . W0[1,:]). */
static void adapter_demo(void) {
    enum { D = 4, K = 3, N = 2 };
    ElraAdapterConfig cfg;
    ElraStatus s = elra_adapter_config_default(ELRA_VARIANT_GENERAL, ELRA_DTYPE_F64, D, K, 1, 100, &cfg);
    CHECK(s == ELRA_OK, "config_default returned %d", (int)s);
    cfg.tau = 0.0;                                  /* no spectral clip */
    cfg.lambda = 0.0;                               /* no energy penalty */
    cfg.eta_multiplier = ELRA_ETA_MULTIPLIER_NONE;  /* eta used as is */
    double w0[D * K];
    for (int i = 0; i < D * K; i++) w0[i] = 0.25 * (i % 5) - 0.3 * (i % 3);
    ElraAdapter *h = NULL;
    s = elra_adapter_create(&cfg, w0, K, &h);
    CHECK(s == ELRA_OK && h != NULL, "create returned %d", (int)s);
    if (!h) return;
    double a[D] = {1, 0, 0, 0}, b[D] = {0, 1, 0, 0}, eta = 0.5;
    CHECK(elra_adapter_set_param_f64(h, ELRA_PARAM_A, a, D, 1, 1) == ELRA_OK, "set A");
    CHECK(elra_adapter_set_param_f64(h, ELRA_PARAM_B, b, 1, D, D) == ELRA_OK, "set B");
    CHECK(elra_adapter_set_param_f64(h, ELRA_PARAM_ETA, &eta, 1, 1, 1) == ELRA_OK, "set eta");

    double x[N * K] = {0.3, -1.0, 2.0, 1.5, 0.25, -0.5};
    double dy[N * D] = {1.0, -2.0, 0.5, 0.0, 0.75, 1.0, -1.0, 2.0};
    double y[N * D], w_new[D * K];
    CHECK(elra_adapter_forward_f64(h, N, x, K, y, D) == ELRA_OK, "forward");
    CHECK(elra_adapter_merge_f64(h, w_new, K) == ELRA_OK, "merge");
    double worst = 0.0;
    for (int i = 0; i < D; i++)
        for (int j = 0; j < K; j++) {
            double want = w0[i * K + j] + (i == 0 ? 0.5 * w0[K + j] : 0.0);
            worst = fmax(worst, fabs(w_new[i * K + j] - want));
        }
    CHECK(worst < 1e-15, "merged weight differs from W0 + G W0 by %g", worst);
    for (int n = 0; n < N; n++)
        for (int i = 0; i < D; i++) {
            double want = 0.0;
            for (int j = 0; j < K; j++) want += x[n * K + j] * w_new[i * K + j];
            worst = fmax(worst, fabs(y[n * D + i] - want));
        }
    CHECK(worst < 1e-14, "forward differs from X W_new^T by %g", worst);
    printf("forward: y[0,0] = %.15f\n", y[0]);

    double dx[N * K], da[D], db[D], deta = 0.0;
    s = elra_adapter_backward_f64(h, N, x, K, dy, D, dx, K, da, 1, db, D, &deta);
    CHECK(s == ELRA_OK, "backward returned %d", (int)s);
    worst = 0.0;
    for (int n = 0; n < N; n++)
        for (int j = 0; j < K; j++) {
            double want = 0.0;
            for (int i = 0; i < D; i++) want += dy[n * D + i] * w_new[i * K + j];
            worst = fmax(worst, fabs(dx[n * K + j] - want));
        }
    CHECK(worst < 1e-14, "dx differs from dY W_new by %g", worst);
    double deta_want = 0.0;
    for (int n = 0; n < N; n++) {
        double xw = 0.0;
        for (int j = 0; j < K; j++) xw += x[n * K + j] * w0[K + j];
        deta_want += dy[n * D] * xw;
    }
    CHECK(fabs(deta - deta_want) < 1e-14, "deta = %.17g, closed form %.17g", deta, deta_want);
    printf("backward: dL/deta = %.15f (closed form %.15f)\n", deta, deta_want);

    /* Save as an adapter directory and load it back onto the same W0. */
    char dir[] = "/tmp/elra-example-XXXXXX";
    if (mkdtemp(dir)) {
        const ElraAdapter *hs[1] = {h};
        const char *names[1] = {"model.layers.0.self_attn.q_proj"};
        s = elra_adapter_save(1, hs, names, dir);
        CHECK(s == ELRA_OK, "save returned %d", (int)s);
        ElraAdapter *back = NULL;
        s = elra_adapter_load(dir, names[0], ELRA_DTYPE_F64, D, K, w0, K, &back);
        CHECK(s == ELRA_OK && back, "load returned %d", (int)s);
        if (back) {
            double w_back[D * K];
            CHECK(elra_adapter_merge_f64(back, w_back, K) == ELRA_OK, "merge after load");
            CHECK(memcmp(w_back, w_new, sizeof w_new) == 0, "loaded adapter merges differently");
            elra_adapter_destroy(back);
        }
        s = elra_adapter_load(dir, "no.such.module", ELRA_DTYPE_F64, D, K, w0, K, &back);
        print_error("load of a missing module", s);
        CHECK(s == ELRA_INVALID_ARGUMENT, "missing module gave %d", (int)s);
        char path[128];
        snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
        remove(path);
        snprintf(path, sizeof path, "%s/adapter_config.json", dir);
        remove(path);
        rmdir(dir);
    }
    elra_adapter_destroy(h);
}

int main(void) {
    CHECK(elra_version() == ELRA_ABI_VERSION, "library ABI %u, header ABI %u", elra_version(),
          (unsigned)ELRA_ABI_VERSION);

    /* A batch of two 2x2 matrices stored with leading dimension 3 and batch stride 7:
     * Z0 = diag(0.5, -1.25) (phi1 is diagonal with the scalar values),
     * Z1 = [[0, 2], [0, 0]] (nilpotent: phi1(Z1) = I + Z1/2, exp(Z1) = I + Z1). */
    enum { B = 2, R = 2, LD = 3, STRIDE = 7, LEN = (B - 1) * STRIDE + (R - 1) * LD + R };
    double z[LEN], out[LEN], ex[LEN];
    for (int i = 0; i < LEN; i++) z[i] = out[i] = ex[i] = -999.0; /* gaps must stay -999 */
    z[0] = 0.5;  z[1] = 0.0;  z[LD] = 0.0;  z[LD + 1] = -1.25;
    z[STRIDE] = 0.0; z[STRIDE + 1] = 2.0; z[STRIDE + LD] = 0.0; z[STRIDE + LD + 1] = 0.0;

    ElraStatus s = elra_expm_phi1_f64(B, R, z, LD, STRIDE, ex, LD, STRIDE, out, LD, STRIDE);
    CHECK(s == ELRA_OK, "elra_expm_phi1_f64 returned %d", (int)s);
    CHECK(fabs(out[0] - phi1_scalar(0.5)) < 1e-15, "phi1(Z0)[0,0] = %.17g", out[0]);
    CHECK(fabs(out[LD + 1] - phi1_scalar(-1.25)) < 1e-15, "phi1(Z0)[1,1] = %.17g", out[LD + 1]);
    CHECK(out[1] == 0.0 && out[LD] == 0.0, "phi1(Z0) off-diagonal");
    CHECK(fabs(out[STRIDE + 1] - 1.0) < 1e-15 && fabs(out[STRIDE] - 1.0) < 1e-15,
          "phi1(Z1) = I + Z1/2");
    CHECK(fabs(ex[STRIDE + 1] - 2.0) < 1e-15, "exp(Z1) = I + Z1");
    CHECK(fabs(ex[0] - exp(0.5)) < 1e-15, "exp(Z0)[0,0]");
    CHECK(out[2] == -999.0 && out[5] == -999.0 && out[6] == -999.0, "gaps untouched");
    printf("phi1(diag(0.5, -1.25)) = diag(%.15f, %.15f)\n", out[0], out[LD + 1]);

    /* Adjoint Frechet derivative of phi1 at a diagonal Z: for diagonal Z = diag(a, b) and
     * G = e_0 e_1^T, L_phi1(Z^T, G)[0,1] = (phi1(a) - phi1(b)) / (a - b) (divided difference). */
    double g[LEN], adj[LEN];
    for (int i = 0; i < LEN; i++) { g[i] = 0.0; adj[i] = -999.0; }
    g[1] = 1.0;
    s = elra_phi1_frechet_adjoint_f64(1, R, z, LD, 0, g, LD, 0, adj, LD, 0);
    CHECK(s == ELRA_OK, "elra_phi1_frechet_adjoint_f64 returned %d", (int)s);
    double dd = (phi1_scalar(0.5) - phi1_scalar(-1.25)) / (0.5 - -1.25);
    CHECK(fabs(adj[1] - dd) < 1e-14, "adjoint[0,1] = %.17g, divided difference %.17g", adj[1], dd);
    CHECK(fabs(adj[0]) < 1e-15 && fabs(adj[LD + 1]) < 1e-15, "adjoint diagonal is zero");
    printf("d<phi1(Z), e0 e1^T>/dZ[0,1] = %.15f (divided difference %.15f)\n", adj[1], dd);

    /* f32 works the same way. */
    float zf[4] = {0.5f, 0.0f, 0.0f, -1.25f}, of[4];
    s = elra_phi1_f32(1, 2, zf, 2, 0, of, 2, 0);
    CHECK(s == ELRA_OK && fabsf(of[0] - (float)phi1_scalar(0.5)) < 1e-6f, "phi1 f32");

    /* The error protocol: status code + thread-local message; outputs untouched. */
    double before = out[0];
    s = elra_phi1_f64(1, R, NULL, LD, 0, out, LD, 0);
    print_error("phi1 with z = NULL", s);
    CHECK(s == ELRA_NULL_POINTER, "NULL z gave %d", (int)s);
    s = elra_phi1_f64(1, 3, z, 2, 0, out, 3, 0);
    print_error("phi1 with ldz < r", s);
    CHECK(s == ELRA_INVALID_ARGUMENT, "ld < r gave %d", (int)s);
    z[0] = NAN;
    s = elra_phi1_f64(1, R, z, LD, 0, out, LD, 0);
    print_error("phi1 with a NaN entry", s);
    CHECK(s == ELRA_NON_FINITE, "NaN gave %d", (int)s);
    CHECK(out[0] == before, "output untouched on error");
    char small[8];
    size_t full = elra_last_error_message(small, sizeof small);
    CHECK(full > sizeof small && strlen(small) <= sizeof small - 1, "truncated message");
    z[0] = 0.5;
    s = elra_phi1_f64(1, R, z, LD, 0, out, LD, 0);
    CHECK(s == ELRA_OK && elra_last_error_message(NULL, 0) == 0, "success clears the message");

    adapter_demo();

    if (failures) {
        fprintf(stderr, "elra_example: %d check(s) failed\n", failures);
        return 1;
    }
    printf("elra_example: all checks passed\n");
    return 0;
}
