/* Work items split over threads, shared by the product kernels (qlinear.c, dense.c). */
#ifndef LONGFIT_PARALLEL_H
#define LONGFIT_PARALLEL_H
#include <stdint.h>

/* Runs item(args, index) for index in [0, items) on num_threads threads (static schedule). One thread runs the loop
 * itself: an OpenMP region has a fixed cost per call even with a team of one, paid by each of a decode step's
 * ~120 products. */
static void for_items(void (*item)(const void *, int64_t), const void *args, int64_t items, int num_threads) {
    if (num_threads > 1) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int64_t index = 0; index < items; index++) item(args, index);
    } else {
        for (int64_t index = 0; index < items; index++) item(args, index);
    }
}

#endif
