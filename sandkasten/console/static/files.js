// Upload into the directory shown: a multipart POST to the JSON API's upload route.
"use strict";
(function () {
  const form = document.getElementById("upload-form");
  if (!form) return;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const error = document.getElementById("upload-error");
    error.textContent = "";
    const data = new FormData();
    data.append("dir", form.dataset.dir);
    for (const file of document.getElementById("upload-files").files) data.append("file", file, file.name);
    try {
      await window.SK.api("POST", form.dataset.url, data);
      window.location.reload();
    } catch (err) {
      error.textContent = err.message;
    }
  });
})();
