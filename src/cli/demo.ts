export async function runDemo(): Promise<boolean> {
  throw new Error('demo not yet implemented');
}
