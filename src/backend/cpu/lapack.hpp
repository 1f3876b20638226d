// LAPACK (OpenBLAS's, Fortran interface) for the linear-algebra ops: column-major, in place, with
// the workspace queries done here. Shared by the CPU backend and the CUDA backend's simulator
// build, which runs the solver's part of an op on the host as cuSOLVER would on the device.
#pragma once

#include <algorithm>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <vector>

// gfortran passes the length of each CHARACTER argument after the others.
extern "C" {
void ssyevd_(const char* jobz, const char* uplo, const int* n, float* a, const int* lda, float* w,
             float* work, const int* lwork, int* iwork, const int* liwork, int* info,
             std::size_t jobz_len, std::size_t uplo_len);
void dsyevd_(const char* jobz, const char* uplo, const int* n, double* a, const int* lda, double* w,
             double* work, const int* lwork, int* iwork, const int* liwork, int* info,
             std::size_t jobz_len, std::size_t uplo_len);
void sgeqrf_(const int* m, const int* n, float* a, const int* lda, float* tau, float* work,
             const int* lwork, int* info);
void dgeqrf_(const int* m, const int* n, double* a, const int* lda, double* tau, double* work,
             const int* lwork, int* info);
void sorgqr_(const int* m, const int* n, const int* k, float* a, const int* lda, const float* tau,
             float* work, const int* lwork, int* info);
void dorgqr_(const int* m, const int* n, const int* k, double* a, const int* lda, const double* tau,
             double* work, const int* lwork, int* info);
}

namespace moetrain::lapack {

namespace detail {
inline void syevd(int n, float* a, float* w, float* work, int lwork, int* iwork, int liwork,
                  int* info) {
  ssyevd_("V", "U", &n, a, &n, w, work, &lwork, iwork, &liwork, info, 1, 1);
}
inline void syevd(int n, double* a, double* w, double* work, int lwork, int* iwork, int liwork,
                  int* info) {
  dsyevd_("V", "U", &n, a, &n, w, work, &lwork, iwork, &liwork, info, 1, 1);
}
inline void geqrf(int n, float* a, float* tau, float* work, int lwork, int* info) {
  sgeqrf_(&n, &n, a, &n, tau, work, &lwork, info);
}
inline void geqrf(int n, double* a, double* tau, double* work, int lwork, int* info) {
  dgeqrf_(&n, &n, a, &n, tau, work, &lwork, info);
}
inline void orgqr(int n, float* a, const float* tau, float* work, int lwork, int* info) {
  sorgqr_(&n, &n, &n, a, &n, tau, work, &lwork, info);
}
inline void orgqr(int n, double* a, const double* tau, double* work, int lwork, int* info) {
  dorgqr_(&n, &n, &n, a, &n, tau, work, &lwork, info);
}
inline void check(int info, const char* what) {
  if (info != 0)
    throw std::runtime_error(std::string("LAPACK ") + what +
                             " failed: info = " + std::to_string(info) +
                             (info < 0 ? " (an illegal argument)" : " (no convergence)"));
}
}  // namespace detail

// The eigenvectors of the symmetric n x n `a` (column-major, upper triangle read) replace it, one
// per column by ascending eigenvalue `w` [n].
template <typename T>
void symmetric_eigen(int n, T* a, T* w) {
  int info = 0, liwork = -1;
  T lwork_q = 0;
  int iwork_q = 0;
  detail::syevd(n, a, w, &lwork_q, -1, &iwork_q, liwork, &info);
  detail::check(info, "?syevd workspace query");
  std::vector<T> work(std::max<std::size_t>(1, std::size_t(lwork_q)));
  std::vector<int> iwork(std::size_t(std::max(1, iwork_q)));
  detail::syevd(n, a, w, work.data(), int(work.size()), iwork.data(), int(iwork.size()), &info);
  detail::check(info, "?syevd");
}

// The n x n `a` (column-major) is replaced by the Q of its QR factorisation (Householder).
template <typename T>
void qr_q(int n, T* a) {
  std::vector<T> tau(std::size_t(std::max(n, 1)));
  int info = 0;
  T q1 = 0, q2 = 0;
  detail::geqrf(n, a, tau.data(), &q1, -1, &info);
  detail::check(info, "?geqrf workspace query");
  detail::orgqr(n, a, tau.data(), &q2, -1, &info);
  detail::check(info, "?orgqr workspace query");
  std::vector<T> work(std::max<std::size_t>(1, std::size_t(std::max(q1, q2))));
  detail::geqrf(n, a, tau.data(), work.data(), int(work.size()), &info);
  detail::check(info, "?geqrf");
  detail::orgqr(n, a, tau.data(), work.data(), int(work.size()), &info);
  detail::check(info, "?orgqr");
}

}  // namespace moetrain::lapack
