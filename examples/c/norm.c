/* The problem's whole-matrix mean-variance normalization, speaking normgrad's line protocol
 * (docs/protocol.md). `./norm chain` is the problem's chain-rule gradient transcribed as
 * derived there; `./norm right` is the corrected gradient. Build: cc -O2 -o norm norm.c -lm
 *
 * forward:  y = (x - mu) / sqrt(var + eps), mu and var (biased) over all N elements.
 * right:    dx = (dy - mean(dy) - y * mean(dy * y)) / sqrt(var + eps)
 * chain:    dx = dy / s + dOut/dsigma2 * dsigma2/dx per element, where the problem's
 *           dy2/dsigma2 = -1/2 y1 / (var+eps)^(3/2) is taken at the element itself (the
 *           Jacobian's diagonal only) and the mean's path, dmu/dx = 1/N, is dropped. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EPS 1e-5

static char *line = NULL;
static size_t cap = 0;

static int read_array(char **p, long *ndim, long dims[8], double **v, long *n) {
    char *end;
    *ndim = strtol(*p, &end, 10);
    if (end == *p || *ndim < 0 || *ndim > 8) return 0;
    *p = end;
    *n = 1;
    for (long k = 0; k < *ndim; k++) {
        dims[k] = strtol(*p, &end, 10);
        if (end == *p || dims[k] < 0) return 0;
        *p = end;
        *n *= dims[k];
    }
    *v = malloc(sizeof(double) * (size_t)(*n > 0 ? *n : 1));
    for (long i = 0; i < *n; i++) {
        (*v)[i] = strtod(*p, &end);
        if (end == *p) return 0;
        *p = end;
    }
    return 1;
}

static void write_array(long ndim, const long dims[8], const double *v, long n) {
    printf("%ld", ndim);
    for (long k = 0; k < ndim; k++) printf(" %ld", dims[k]);
    for (long i = 0; i < n; i++) printf(" %.17g", v[i]);
    printf("\n");
    fflush(stdout);
}

static void stats(const double *x, long n, double *mean, double *s) {
    double m = 0, var = 0;
    for (long i = 0; i < n; i++) m += x[i];
    m /= n;
    for (long i = 0; i < n; i++) var += (x[i] - m) * (x[i] - m);
    var /= n;
    *mean = m;
    *s = sqrt(var + EPS);
}

static void backward(int chain, const double *x, const double *dy, double *dx, long n) {
    double mean, s;
    stats(x, n, &mean, &s);
    if (chain) {
        for (long i = 0; i < n; i++) {
            double y1 = x[i] - mean;
            double dy2_dy1 = 1.0 / s;
            double dy2_dvar = -0.5 * y1 / (s * s * s);
            double dvar_dx = 2.0 * y1 / n;
            dx[i] = dy[i] * (dy2_dy1 * 1.0 + dy2_dvar * dvar_dx);
        }
        return;
    }
    double mdy = 0, mdyy = 0;
    for (long i = 0; i < n; i++) {
        double y = (x[i] - mean) / s;
        mdy += dy[i];
        mdyy += dy[i] * y;
    }
    mdy /= n;
    mdyy /= n;
    for (long i = 0; i < n; i++) dx[i] = (dy[i] - mdy - (x[i] - mean) / s * mdyy) / s;
}

int main(int argc, char **argv) {
    if (argc != 2 || (strcmp(argv[1], "chain") && strcmp(argv[1], "right"))) {
        fprintf(stderr, "usage: %s chain|right\n", argv[0]);
        return 2;
    }
    int chain = strcmp(argv[1], "chain") == 0;
    while (getline(&line, &cap, stdin) > 0) {
        char *p = strchr(line, ' ');
        long ndim, dims[8], n, ndim2, dims2[8], n2;
        double *x = NULL, *t = NULL;
        if (p == NULL || !read_array(&p, &ndim, dims, &x, &n) || n == 0) {
            printf("error malformed request\n");
            fflush(stdout);
            free(x);
            continue;
        }
        double *out = malloc(sizeof(double) * (size_t)n);
        if (strncmp(line, "forward ", 8) == 0) {
            double mean, s;
            stats(x, n, &mean, &s);
            for (long i = 0; i < n; i++) out[i] = (x[i] - mean) / s;
            write_array(ndim, dims, out, n);
        } else if (strncmp(line, "backward ", 9) == 0 && read_array(&p, &ndim2, dims2, &t, &n2) &&
                   n2 == n) {
            backward(chain, x, t, out, n);
            write_array(ndim, dims, out, n);
        } else {
            printf("error unsupported\n");
            fflush(stdout);
        }
        free(x);
        free(t);
        free(out);
    }
    free(line);
    return 0;
}
