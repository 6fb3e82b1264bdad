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
 * gradient of <phi1(Z), G>), checks them against closed forms, shows the error protocol, and
 * prints "elra_example: all checks passed" on success (exit code 0; 1 on any failure).
 */
#include "elra.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

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

    if (failures) {
        fprintf(stderr, "elra_example: %d check(s) failed\n", failures);
        return 1;
    }
    printf("elra_example: all checks passed\n");
    return 0;
}
